"""The transformer recipes' machinery: per-parameter lr and weight decay (mmseg's paramwise_cfg and ConvNeXt's
stage-wise lr decay) on small modules named like the real ConvNeXt, Swin and SegFormer models, the warm-up + poly
schedules against hand-computed values, and fp16's loss scaler skipping a step and resuming exactly."""
import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from hlbench.compose import compose
from hlbench.config_checks import check_config
from hlbench.engine.optim import build_optimizer, lr_at, set_lr
from hlbench.engine.param_groups import param_groups
from hlbench.errors import ConfigError
from hlbench.methods import Method
from hlbench.methods.supervised import Supervised
from hlbench.models.heads import ConvBNReLU
from hlbench.run import run_experiment
from tests.conftest import compose_run, SMOKE_HL, SMOKE_HL_RUN, TINY


class _Params(nn.Module):
    """Bare parameters under their own names (position tables, layer scales)."""

    def __init__(self, **shapes):
        super().__init__()
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.zeros(shape)))


def _tree(spec) -> nn.Module:
    """Nested dicts of modules as a module whose parameter names are the dotted dict keys."""
    return nn.ModuleDict({k: _tree(v) if isinstance(v, dict) else v for k, v in spec.items()})


def _head(cin, classes):
    """A decode head's names: ConvModules (conv + bn) and conv_seg."""
    return {"bottleneck": ConvBNReLU(cin, 4, 3), "conv_seg": nn.Conv2d(4, classes, 1)}


def _heads(cin):
    return {"decode_head": _head(cin, 3), "auxiliary_head": _head(cin, 3), "hl_head": _head(cin, 1)}


def _segformer_like():
    """mmseg MixVisionTransformer (2 stages of patch embed, one block, stage norm) + two SegformerHeads (the decode
    head and its HL copy)."""
    def stage(c):
        block = {"norm1": nn.LayerNorm(c), "attn": {"attn": nn.MultiheadAttention(c, 1), "sr": nn.Conv2d(c, c, 2, 2),
                                                    "norm": nn.LayerNorm(c)},
                 "norm2": nn.LayerNorm(c),
                 "ffn": {"layers": nn.Sequential(nn.Conv2d(c, 4 * c, 1), nn.Conv2d(4 * c, 4 * c, 3, groups=4 * c),
                                                 nn.GELU(), nn.Dropout(), nn.Conv2d(4 * c, c, 1))}}
        return {"0": {"projection": nn.Conv2d(3, c, 3), "norm": nn.LayerNorm(c)}, "1": {"0": block},
                "2": nn.LayerNorm(c)}

    def head(classes):
        return {"convs": {"0": ConvBNReLU(8, 4), "1": ConvBNReLU(8, 4)}, "fusion_conv": ConvBNReLU(8, 4),
                "conv_seg": nn.Conv2d(4, classes, 1)}
    return _tree({"backbone": {"layers": {"0": stage(8), "1": stage(8)}}, "decode_head": head(3),
                  "hl_head": head(1)})


def _swin_like():
    """mmseg SwinTransformer (patch embed, one stage of one block + PatchMerging, an output norm) + UPer-like
    decode, aux and HL heads."""
    c = 8
    block = {"norm1": nn.LayerNorm(c),
             "attn": {"w_msa": {"qkv": nn.Linear(c, 3 * c), "proj": nn.Linear(c, c),
                                "bias": _Params(relative_position_bias_table=(9, 2))}},
             "norm2": nn.LayerNorm(c),
             "ffn": {"layers": nn.Sequential(nn.Sequential(nn.Linear(c, 4 * c), nn.GELU()), nn.Linear(4 * c, c))}}
    backbone = {"embed": _Params(absolute_pos_embed=(1, 4, c)),
                "patch_embed": {"projection": nn.Conv2d(3, c, 4, 4), "norm": nn.LayerNorm(c)},
                "stages": {"0": {"blocks": {"0": block},
                                 "downsample": {"norm": nn.LayerNorm(4 * c), "reduction": nn.Linear(4 * c, 2 * c,
                                                                                                     bias=False)}}},
                "norm0": nn.LayerNorm(c)}
    return _tree({"backbone": backbone, **_heads(c)})


def _convnext_like():
    """mmpretrain ConvNeXt (stem and downsampling layers, stages of 1/1/4/1 blocks, output norms norm0-3) + UPer-like
    decode, aux and HL heads."""
    c = 8

    def block():
        return {"depthwise_conv": nn.Conv2d(c, c, 7, padding=3, groups=c), "norm": nn.LayerNorm(c),
                "pointwise_conv1": nn.Linear(c, 4 * c), "pointwise_conv2": nn.Linear(4 * c, c),
                "scale": _Params(gamma=(c,))}
    downsample = {"0": nn.Sequential(nn.Conv2d(3, c, 4, 4), nn.LayerNorm(c)),
                  **{str(i): nn.Sequential(nn.LayerNorm(c), nn.Conv2d(c, c, 2, 2)) for i in (1, 2, 3)}}
    stages = {str(s): {str(b): block() for b in range(n)} for s, n in enumerate((1, 1, 4, 1))}
    return _tree({"backbone": {"downsample_layers": downsample, "stages": stages,
                               **{f"norm{i}": nn.LayerNorm(c) for i in range(4)}}, **_heads(c)})


def _settings(model, groups) -> dict[str, tuple[float, float]]:
    """{parameter name: (lr multiplier, decay multiplier)}."""
    by_id = {id(p): (g["lr_mult"], g["decay_mult"]) for g in groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


def _counts(groups) -> dict[tuple[float, float], int]:
    return {(round(g["lr_mult"], 12), g["decay_mult"]): len(g["params"]) for g in groups}


def _method(cfg_optim, hl_lr_mult=1.0, method_lr_mult=None):
    return Method(OmegaConf.create({"optim": cfg_optim, "method": {"lr_mult": method_lr_mult or {}},
                                    "hl": {"enabled": True, "lr_mult": hl_lr_mult, "semisup": {"apply_to": ["sup"]}}}))


SEGFORMER = {"custom_keys": {"pos_block": {"decay_mult": 0.0}, "norm": {"decay_mult": 0.0}, "head": {"lr_mult": 10.0}}}
SWIN = {"custom_keys": {"absolute_pos_embed": {"decay_mult": 0.0}, "relative_position_bias_table": {"decay_mult": 0.0},
                        "norm": {"decay_mult": 0.0}}}
CONVNEXT = {"layer_decay": {"type": "stage_wise", "rate": 0.9, "num_layers": 12}}


# (a) parameter groups


def test_segformer_keys_give_the_head_and_its_hl_copy_lr_x10_and_norms_no_decay():
    model = _segformer_like()
    groups = param_groups(model, SEGFORMER, {"hl_head.": 1.0})
    # Per stage: 16 decayed tensors at lr x1 (patch conv 2, packed attention 4, sr conv 2, MixFFN 6, stage norm
    # layers.<i>.2 2: no "norm" in its name) and 8 "norm" tensors; per head 11 tensors (3 ConvModules x 3 + conv_seg 2),
    # their BN included, at lr x10 with decay.
    assert _counts(groups) == {(1.0, 1.0): 32, (1.0, 0.0): 16, (10.0, 1.0): 22}
    got = _settings(model, groups)
    assert got["backbone.layers.0.2.weight"] == (1.0, 1.0)
    assert got["backbone.layers.1.1.0.attn.norm.bias"] == (1.0, 0.0)
    assert got["backbone.layers.0.1.0.attn.attn.in_proj_weight"] == (1.0, 1.0)
    assert got["hl_head.convs.0.bn.weight"] == got["decode_head.conv_seg.bias"] == (10.0, 1.0)
    # hl.lr_mult scales the HL branch on top of the recipe's rule.
    assert _settings(model, param_groups(model, SEGFORMER, {"hl_head.": 2.0}))["hl_head.conv_seg.weight"] == (20.0, 1.0)


def test_custom_keys_longest_first_then_alphabetical_and_top_level_names_start_with_a_dot():
    model = _tree({"decode_head": {"norm": nn.LayerNorm(2)}, "head_norm": nn.LayerNorm(2)})
    model.add_module("top", _Params(w=(2,)))
    model.register_parameter("bare", nn.Parameter(torch.zeros(2)))
    rules = {"norm": {"decay_mult": 0.0}, "head": {"lr_mult": 10.0}, "decode_head.norm": {"lr_mult": 3.0},
             ".bare": {"lr_mult": 5.0}}
    got = _settings(model, param_groups(model, {"custom_keys": rules}, {}))
    assert got["decode_head.norm.weight"] == (3.0, 1.0)   # the longest key decides alone
    assert got["head_norm.weight"] == (10.0, 1.0)         # "head" and "norm" tie on length: "head" comes first
    assert got["bare"] == (5.0, 1.0)                      # mmengine reads a top-level parameter as ".bare"
    assert got["top.w"] == (1.0, 1.0)


def test_swin_keys_take_decay_off_position_tables_and_norms_only():
    model = _swin_like()
    got = _settings(model, param_groups(model, SWIN, {"hl_head.": 1.0}))
    no_decay = sorted(n for n, s in got.items() if s == (1.0, 0.0))
    assert no_decay == ["backbone.embed.absolute_pos_embed", "backbone.norm0.bias", "backbone.norm0.weight",
                        "backbone.patch_embed.norm.bias", "backbone.patch_embed.norm.weight",
                        "backbone.stages.0.blocks.0.attn.w_msa.bias.relative_position_bias_table",
                        "backbone.stages.0.blocks.0.norm1.bias", "backbone.stages.0.blocks.0.norm1.weight",
                        "backbone.stages.0.blocks.0.norm2.bias", "backbone.stages.0.blocks.0.norm2.weight",
                        "backbone.stages.0.downsample.norm.bias", "backbone.stages.0.downsample.norm.weight"]
    # The rest keeps lr x1 and its decay: 11 backbone tensors and 5 per head (the heads' BN is "bn", not "norm").
    assert sum(s == (1.0, 1.0) for s in got.values()) == 11 + 15 and len(got) == 12 + 26


def test_convnext_stage_wise_lr_decay():
    model = _convnext_like()
    groups = param_groups(model, CONVNEXT, {"hl_head.": 1.0})
    # n = 12 + 2 = 14 ids: downsampling layers id 0 -> 0.9^13, stages.<s> id s+1 -> 0.9^(12-s), the rest id 13 -> 1.
    # Decay only on tensors of 2+ dimensions: 1 per downsampling layer (its conv) and 3 per block (dw conv, two
    # linears); the others (biases, LayerNorms, gamma) none. Heads: conv and conv_seg weights decay, BN and bias not.
    expected = {(0.9 ** 13, 1.0): 4, (0.9 ** 13, 0.0): 12,
                (0.9 ** 12, 1.0): 3, (0.9 ** 12, 0.0): 6, (0.9 ** 11, 1.0): 3, (0.9 ** 11, 0.0): 6,
                (0.9 ** 10, 1.0): 12, (0.9 ** 10, 0.0): 24, (0.9 ** 9, 1.0): 3, (0.9 ** 9, 0.0): 6,
                (1.0, 0.0): 8 + 9, (1.0, 1.0): 6}
    assert _counts(groups) == {(round(lr, 12), d): n for (lr, d), n in expected.items()}
    got = _settings(model, groups)
    assert got["backbone.stages.2.3.pointwise_conv1.weight"] == pytest.approx((0.9 ** 10, 1.0))
    assert got["backbone.stages.3.0.scale.gamma"] == pytest.approx((0.9 ** 9, 0.0))
    assert got["backbone.downsample_layers.2.0.weight"] == pytest.approx((0.9 ** 13, 0.0))
    assert got["backbone.norm3.weight"] == got["hl_head.bottleneck.bn.bias"] == (1.0, 0.0)
    assert got["hl_head.conv_seg.weight"] == (1.0, 1.0)


def test_layer_decay_needs_convnext_names():
    with pytest.raises(ConfigError, match="optim.paramwise.layer_decay.*backbone.downsample_layers"):
        param_groups(_swin_like(), CONVNEXT, {})


def test_norm_and_bias_decay_mults_where_no_custom_key_matches():
    model = _tree({"conv": nn.Conv2d(2, 2, 1), "bn": nn.BatchNorm2d(2), "ln": nn.LayerNorm(2), "fc": nn.Linear(2, 2)})
    rules = {"norm_decay_mult": 0.0, "bias_decay_mult": 0.5, "custom_keys": {"fc": {"lr_mult": 2.0}}}
    got = _settings(model, param_groups(model, rules, {}))
    assert got == {"conv.weight": (1.0, 1.0), "conv.bias": (1.0, 0.5), "bn.weight": (1.0, 0.0), "bn.bias": (1.0, 0.0),
                   "ln.weight": (1.0, 0.0), "ln.bias": (1.0, 0.0), "fc.weight": (2.0, 1.0), "fc.bias": (2.0, 1.0)}


def test_without_paramwise_rules_the_groups_are_the_method_multipliers_alone():
    model = _segformer_like()
    groups = _method({"paramwise": None}, hl_lr_mult=10.0).param_groups(model)
    hl = [p for n, p in model.named_parameters() if n.startswith("hl_head.")]
    assert [(g["lr_mult"], g["decay_mult"], len(g["params"])) for g in groups] == [(1.0, 1.0, 59), (10.0, 1.0, 11)]
    assert groups[1]["params"] == hl
    opt = build_optimizer(groups, OmegaConf.create({"name": "adamw", "lr": 6e-5, "betas": [0.9, 0.999],
                                                    "weight_decay": 0.01}))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.01]


@pytest.mark.parametrize("recipe,model,expected", [
    ("ade20k_segformer_160k", _segformer_like, {(1.0, 1.0): 32, (1.0, 0.0): 16, (10.0, 1.0): 22}),
    ("ade20k_swin_160k", _swin_like, {(1.0, 0.0): 12, (1.0, 1.0): 26}),
    ("cityscapes_convnext_40k", _convnext_like, {(1.0, 1.0): 6, (round(0.9 ** 9, 12), 1.0): 3}),
])
def test_recipes_build_their_groups_and_weight_decays(hydra_ctx, recipe, model, expected):
    cfg = compose([f"recipe={recipe}"])
    check_config(cfg)
    net = model()
    groups = Method(cfg).param_groups(net)
    assert _counts(groups).items() >= expected.items()
    opt = build_optimizer(groups, cfg.optim)
    set_lr(opt, 1.0)
    assert all(g["weight_decay"] == cfg.optim.weight_decay * g["decay_mult"] and g["lr"] == g["lr_mult"]
               for g in opt.param_groups)


@pytest.mark.parametrize("override,key", [
    ("+optim.paramwise.custom_keys.head.lr_multi=10", "optim.paramwise.custom_keys.head"),
    ("+optim.paramwise.custom_keys.head.lr_mult=-1", "optim.paramwise.custom_keys.head.lr_mult"),
    ("optim.paramwise.norm_decay_mult=x", "optim.paramwise.norm_decay_mult"),
    ("+optim.paramwise.layer_decay={type: layer_wise, rate: 0.9, num_layers: 12}", "optim.paramwise.layer_decay.type"),
    ("+optim.paramwise.layer_decay={type: stage_wise, rate: 0.9}", "optim.paramwise.layer_decay"),
    ("optim.paramwise.norm_decay_mult=0", "optim.paramwise.layer_decay replaces"),
    ("optim.lr_schedule=cosine", "optim.lr_schedule"),
])
def test_bad_paramwise_values_name_the_key(hydra_ctx, override, key):
    recipe = ["recipe=cityscapes_convnext_40k"] if "replaces" in key else []
    cfg = compose(recipe + [override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_config(cfg)


# (b) schedules


def _schedule(**kw):
    return OmegaConf.create({"lr": 1e-4, "min_lr": 0.0, "power": 1.0, "warmup_iters": 1500, "warmup_ratio": 1e-6, **kw})


@pytest.mark.parametrize("it,expected", [
    (0, 1e-10),                      # 1e-4 x (1 - 0) x 1e-6
    (1, 6.6764931e-8),               # 1e-4 x (1 - 1/40000) x (1e-6 + (1 - 1e-6) / 1500)
    (750, 4.906254906e-5),           # 1e-4 x 0.98125 x 0.5000005
    (1500, 9.625e-5),                # 1e-4 x (1 - 1500/40000): warm-up over
    (39999, 2.5e-9),                 # 1e-4 x 1/40000
])
def test_mmcv_warmup_scales_the_poly_value(it, expected):
    assert lr_at(it, 40000, _schedule(lr_schedule="mmcv")) == pytest.approx(expected, rel=1e-6)


def test_bisenetv2_sgd_warmup_with_min_lr():
    cfg = _schedule(lr=0.05, min_lr=1e-4, power=0.9, warmup_iters=1000)
    # ((0.05 - 1e-4) x (1 - 500/160000)^0.9 + 1e-4) x (1 - 0.5 x (1 - 1e-6)) = 0.04985963 x 0.5000005
    assert lr_at(500, 160000, cfg) == pytest.approx(0.0249298421, rel=1e-6)
    assert lr_at(1000, 160000, cfg) == pytest.approx((0.05 - 1e-4) * (1 - 1000 / 160000) ** 0.9 + 1e-4)


@pytest.mark.parametrize("it,expected", [
    (0, 6e-11),                      # LinearLR: 6e-5 x start_factor 1e-6
    (750, 3.002004332e-5),           # 6e-5 x (1e-6 + (1 - 1e-6) x 750/1499): the factor spans end - begin - 1 steps
    (1499, 6e-5),                    # warm-up complete one iteration before PolyLR begins
    (1500, 6e-5),                    # PolyLR's first step keeps the lr
    (80000, 3.028372419e-5),         # 6e-5 x (1 - 78500/158499)
    (159999, 0.0),
])
def test_mmengine_linear_then_poly(it, expected):
    assert lr_at(it, 160000, _schedule(lr=6e-5, lr_schedule="mmengine")) == pytest.approx(expected, rel=1e-6,
                                                                                          abs=1e-20)


def test_group_lr_is_the_schedule_times_its_multiplier():
    model = _segformer_like()
    opt = build_optimizer(param_groups(model, SEGFORMER, {}), _schedule(name="adamw", lr=6e-5, betas=[0.9, 0.999],
                                                                        weight_decay=0.01))
    set_lr(opt, lr_at(80000, 160000, _schedule(lr=6e-5, lr_schedule="mmengine")))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([3.028372419e-5, 3.028372419e-5, 3.028372419e-4])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0, 0.01]


# (c) fp16 loss scaling in the train loop


class _Overflow(torch.autograd.Function):
    """Adds 0 to the loss and sends inf back: a finite loss whose gradients overflow, as an fp16 step can."""

    @staticmethod
    def forward(ctx, x):
        return x * 0

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


FP16 = TINY + [*SMOKE_HL, "train.iters=5", "train.ckpt_interval=1",
               "train.keep_checkpoints=0", "train.log_interval=1", "train.precision=fp16"]


def _train(over, out):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # resumed and uninterrupted runs then round alike
    try:
        return run_experiment(compose_run(over, out)[0], SMOKE_HL_RUN, None, "smoke")
    finally:
        torch.set_num_threads(threads)


def test_fp16_overflow_skips_the_step_without_a_fault_and_resume_restores_the_scale(hydra_ctx, tmp_path,
                                                                                 monkeypatch):
    # CPU fp16 convolutions take seconds a step here: the scaler, not fp16 arithmetic, is under test, so the forward
    # runs in fp32 while train.precision=fp16 switches the loss scaler on.
    monkeypatch.setattr("hlbench.engine.trainer.autocast", lambda device, precision: nullcontext())
    real = Supervised.step

    def step(self, model, batches, it):
        loss, logs = real(self, model, batches, it)
        return (loss + _Overflow.apply(loss), logs) if it + 1 == 3 else (loss, logs)
    monkeypatch.setattr(Supervised, "step", step)

    summary = _train(FP16, tmp_path / "full")
    ckpts = Path(summary["run_dir"]) / "checkpoints"
    state = {it: torch.load(ckpts / f"iter_{it:06d}.pth", weights_only=False) for it in range(2, 6)}
    assert summary["skipped_nonfinite"]["count"] == 0  # the guard saw finite losses throughout
    assert [state[it]["scaler"]["scale"] for it in (2, 3, 5)] == [65536.0, 32768.0, 32768.0]
    weights = [k for k in state[2]["model"] if "running_" not in k and "num_batches" not in k]
    assert all(torch.equal(state[3]["model"][k], state[2]["model"][k]) for k in weights)  # no update at 3
    assert not all(torch.equal(state[4]["model"][k], state[3]["model"][k]) for k in weights)
    assert state[3]["optimizer"]["state"].keys() == state[2]["optimizer"]["state"].keys()
    assert all(torch.equal(state[3]["optimizer"]["state"][i]["momentum_buffer"], s["momentum_buffer"])
               for i, s in state[2]["optimizer"]["state"].items())

    # Resumed from iteration 4, after the skip: the halved scale and its growth count come back with the weights.
    (ckpts / "iter_000005.pth").unlink()
    resumed = _train(FP16 + ["resume=true"], tmp_path / "full")
    assert resumed["resumed_from"] == 4
    final = torch.load(ckpts / "iter_000005.pth", weights_only=False)
    assert final["scaler"] == state[5]["scaler"]
    assert all(torch.equal(final["model"][k], v) for k, v in state[5]["model"].items())
