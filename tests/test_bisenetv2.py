"""BiSeNetV2: output strides at odd sizes, mmseg key names, its four auxiliary heads (a list of aux heads: outputs,
loss terms and weights, checkpoint keys), the HL copy of the decode head and the tiny smoke model. Logit parity with
mmseg itself is analysis/mmseg_parity.py's."""
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

import hlbench.models
from hlbench.compose import compose
from hlbench.errors import ConfigError
from hlbench.losses import pixel_cross_entropy
from hlbench.methods import LabelledLoss
from hlbench.models import build_model, load_checkpoint
from hlbench.models.bisenetv2 import BiSeNetV2
from hlbench.models.heads import FCNHead, ProjectedHead, resize
from hlbench.models.segmentor import AuxiliaryHeads

MODEL_DIR = Path(hlbench.models.__file__).parents[1] / "conf" / "model"
NARROW = {"detail_channels": (8, 8, 16), "semantic_channels": (4, 8, 8, 16), "bga_channels": 16,
          "semantic_expansion_ratio": 2}


def _halved(size, times):
    for _ in range(times):
        size = math.ceil(size / 2)
    return size


def test_outputs_at_odd_sizes():
    net = BiSeNetV2(**NARROW).eval()
    for h, w in [(33, 47), (97, 71)]:
        with torch.no_grad():
            feats = net(torch.randn(1, 3, h, w))
        # The aggregation at stride 8, then the semantic stages at strides 4, 8, 16 and 32 (each halving rounds up).
        assert [f.shape[2:] for f in feats] == [(_halved(h, n), _halved(w, n)) for n in (3, 2, 3, 4, 5)]
        assert [f.shape[1] for f in feats] == net.out_channels == [16, 4, 8, 8, 16]
    picked = BiSeNetV2(**NARROW, out_indices=(4, 0))
    assert picked.out_channels == [16, 16] and [f.shape[1] for f in picked(torch.randn(2, 3, 33, 33))] == [16, 16]


def test_mmseg_key_names():
    with torch.device("meta"):
        model = build_model(OmegaConf.load(MODEL_DIR / "bisenetv2.yaml"), num_classes=19)
    sd = model.state_dict()
    assert len(sd) == 385  # mmseg 1.2.2's EncoderDecoder of this config, num_batches_tracked included
    shapes = {"backbone.detail.detail_branch.0.0.conv.weight": (64, 3, 3, 3),
              "backbone.detail.detail_branch.2.2.bn.running_var": (128,),
              "backbone.semantic.stage1.conv_first.conv.weight": (16, 3, 3, 3),
              "backbone.semantic.stage1.convs.0.conv.weight": (8, 16, 1, 1),
              "backbone.semantic.stage1.fuse_last.conv.weight": (16, 32, 3, 3),
              "backbone.semantic.stage2.0.dwconv.1.conv.weight": (96, 1, 3, 3),
              "backbone.semantic.stage2.0.shortcut.0.depthwise_conv.conv.weight": (16, 1, 3, 3),
              "backbone.semantic.stage2.0.shortcut.0.pointwise_conv.bn.weight": (32,),
              "backbone.semantic.stage4.0.dwconv.0.conv.weight": (384, 1, 3, 3),
              "backbone.semantic.stage4.3.conv2.0.bn.bias": (128,),
              "backbone.semantic.stage4_CEBlock.gap.1.running_mean": (128,),
              "backbone.semantic.stage4_CEBlock.conv_gap.conv.weight": (128, 128, 1, 1),
              "backbone.bga.detail_dwconv.0.pointwise_conv.conv.bias": (128,),
              "backbone.bga.detail_down.0.bn.weight": (128,),
              "backbone.bga.semantic_conv.0.conv.weight": (128, 128, 3, 3),
              "backbone.bga.conv.bn.weight": (128,),
              "decode_head.convs.0.conv.weight": (1024, 128, 3, 3),
              "auxiliary_head.0.convs.1.conv.weight": (16, 16, 3, 3),
              "auxiliary_head.3.convs.0.conv.weight": (1024, 128, 3, 3),
              "auxiliary_head.3.conv_seg.weight": (19, 1024, 1, 1)}
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    # A conv has a bias exactly where no BN follows it: the aggregation's pointwise convs and the classifiers.
    assert sorted(k for k in sd if k.endswith("conv.bias")) == [
        "backbone.bga.detail_dwconv.0.pointwise_conv.conv.bias",
        "backbone.bga.semantic_dwconv.0.pointwise_conv.conv.bias"]


@pytest.mark.parametrize("kwargs, match", [
    ({"bga_channels": 32}, "bga_channels"),
    ({"out_indices": (0, 5)}, "out_indices"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BiSeNetV2(**{**NARROW, **kwargs})


def _tiny(hl_overrides=(), aux_weights=None):
    """The tiny smoke model's run config and model with HL (num_classes 3), the aux loss weights replaced if given."""
    overrides = ["model=tiny/bisenetv2", "hl.enabled=true", *hl_overrides]
    if aux_weights is not None:
        overrides += [f"model.aux.{i}.loss_weight={w}" for i, w in enumerate(aux_weights)]
    cfg = compose(overrides)
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, num_classes=3, hl=cfg.hl).train()


def test_four_aux_heads_each_with_its_loss_term_and_weight(hydra_ctx):
    cfg, model = _tiny(aux_weights=[1.0, 0.5, 0.25, 2.0])
    assert isinstance(model.auxiliary_head, AuxiliaryHeads)
    assert [(h.in_index, h.in_channels, h.channels, len(h.convs)) for h in model.auxiliary_head] == [
        (1, 4, 4, 2), (2, 8, 16, 2), (3, 16, 64, 2), (4, 32, 256, 2)]
    img, label = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    label[:, :8] = 255
    out = model(img)
    assert {k: v.shape[2:] for k, v in out.items() if k.startswith("aux")} == {
        "aux_0": (16, 16), "aux_1": (8, 8), "aux_2": (4, 4), "aux_3": (2, 2)}
    terms = LabelledLoss(cfg, 2)(out, label, model.align_corners)
    expected = [w * pixel_cross_entropy(resize(out[f"aux_{i}"], (64, 64), False), label).mean()
                for i, w in enumerate([1.0, 0.5, 0.25, 2.0])]
    for i, value in enumerate(expected):
        assert torch.allclose(terms.logs[f"aux_{i}.loss_ce"], value) and f"aux_{i}.acc_seg" in terms.logs
    assert "aux.loss_ce" not in terms.logs and torch.allclose(terms.aux, sum(expected))
    # A list entry without loss_weight falls back to loss.aux_weight, as a single aux head's.
    with open_dict(cfg):
        del cfg.model.aux[1]["loss_weight"]
    fallback = LabelledLoss(cfg, 2)(out, label, model.align_corners)
    assert torch.allclose(fallback.logs["aux_1.loss_ce"], expected[1] / 0.5 * cfg.loss.aux_weight)


def test_hl_copies_the_decode_head_only_and_the_light_head_works(hydra_ctx):
    _, model = _tiny()
    hl, decode = model.hl_head, model.decode_head
    assert isinstance(hl, FCNHead) and hl.conv_seg.out_channels == 1
    assert (hl.in_index, hl.in_channels, hl.channels, len(hl.convs)) == (0, 32, 256, 1) == \
        (decode.in_index, decode.in_channels, decode.channels, len(decode.convs))
    n_params = [sum(p.numel() for p in head.parameters()) for head in (hl, decode)]
    assert n_params[0] == n_params[1] - 2 * (256 + 1)  # one classifier output instead of three; no aux copy
    _, light = _tiny(["hl.head_channels=16"])
    assert isinstance(light.hl_head, ProjectedHead) and light.hl_head.head.channels == 16
    out = light(torch.randn(2, 3, 64, 64))
    assert out["hl"].shape == out["out"].shape[:1] + (1,) + out["out"].shape[2:]


def test_tiny_model_trains_with_hl_at_64px(hydra_ctx):
    cfg, model = _tiny()
    label = torch.randint(0, 3, (2, 64, 64))
    terms = LabelledLoss(cfg, 2)(model(torch.randn(2, 3, 64, 64)), label, model.align_corners)
    loss = terms.seg + terms.hl + terms.aux
    assert torch.isfinite(loss) and terms.hl.ne(0) and set(terms.logs) >= {"decode.loss_ce", "weight_loss",
                                                                           "aux_3.loss_ce"}
    loss.backward()
    for name in ("backbone.detail", "backbone.semantic.stage1", "backbone.bga", "decode_head", "hl_head",
                 *(f"auxiliary_head.{i}" for i in range(4))):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name + ".")]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), name
    assert model.eval().predict(torch.randn(1, 3, 65, 63)).shape == (1, 3, 65, 63)


def test_an_mmseg_hl_checkpoint_with_aux_heads_loads_completely(hydra_ctx, tmp_path):
    _, model = _tiny()
    # The authors' HL checkpoints name the HL branch weigh_head; mmseg names a list of aux heads auxiliary_head.<i>.
    state = {k.replace("hl_head.", "weigh_head.", 1): v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "meta": {}}, tmp_path / "bisenetv2_hl.pth")
    _, fresh = _tiny()
    report = load_checkpoint(fresh, tmp_path / "bisenetv2_hl.pth", require_all=True)
    assert report["missing"] == [] and report["unexpected"] == []
    assert torch.equal(fresh.auxiliary_head[3].conv_seg.weight, model.auxiliary_head[3].conv_seg.weight)
