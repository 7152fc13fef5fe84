"""The DeepLabV3+ R101 of U2PL and UniMatch: ResNetV1s (keys, OS8 multi-grid, ceil-mode pool), the plain-conv
ASPPPlusHead, the outputs of both variants (U2PL "rep" and aux, UniMatch's feature perturbation), the HL copy, and
loading the references' ImageNet file and released checkpoints. Logit parity with their code:
analysis/semisup_parity.py."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

import hlbench.models
from hlbench.errors import BadFileError, ConfigError
from hlbench.models import build_model, load_checkpoint, load_pretrained
from hlbench.models.checkpoints import map_checkpoint_keys
from hlbench.models.heads import FP_DROPOUT, ASPPPlusHead, resize
from hlbench.models.resnet import ResNetV1c, ResNetV1s

MODEL_DIR = Path(hlbench.models.__file__).parents[1] / "conf" / "model"
NUM_CLASSES = 5
# Quarter width (stages 64/128/256/512) and R50 depth: the real configs' structure at CPU-test cost.
TINY = {"backbone": {"depth": 50, "width_mult": 0.25, "pretrained": "none"},
        "head": {"channels": 16}}
TINY_HEAD = {"u2pl": {"c1_channels": 16, "rep_channels": 8}, "unimatch": {"c1_channels": 8}}


def _config(variant, **backbone):
    cfg = OmegaConf.load(MODEL_DIR / f"deeplabv3plus_r101_{variant}.yaml")
    tiny = OmegaConf.merge(TINY, {"head": TINY_HEAD[variant], "backbone": backbone})
    if variant == "u2pl":
        tiny = OmegaConf.merge(tiny, {"aux": {"channels": 8}})
    return OmegaConf.merge(cfg, tiny)


def _model(variant, hl=True, seed=0):
    torch.manual_seed(seed)
    model = build_model(_config(variant), NUM_CLASSES, hl={"enabled": hl})
    with torch.no_grad():  # non-trivial BN statistics, so that a wrongly loaded buffer shows
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    return model


def _dilations(layer):
    return [block.conv2.dilation[0] for block in layer]


# --- backbone ---------------------------------------------------------------------------------------------------

def test_v1s_has_the_references_key_names():
    with torch.device("meta"):
        state = ResNetV1s(101).state_dict()
    # u2pl/models/resnet.py and UniMatch model/backbone/resnet.py: the stem's convs and first two BNs in the
    # Sequential conv1, the last BN as bn1.
    stem = {k for k in state if not k.startswith("layer")}
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    assert stem == ({"conv1.0.weight", "conv1.3.weight", "conv1.6.weight"} | {f"conv1.1.{b}" for b in bn}
                    | {f"conv1.4.{b}" for b in bn} | {f"bn1.{b}" for b in bn})
    assert state["conv1.0.weight"].shape == (64, 3, 3, 3) and state["conv1.3.weight"].shape == (64, 64, 3, 3)
    assert state["conv1.6.weight"].shape == (128, 64, 3, 3) and state["bn1.weight"].shape == (128,)
    assert state["layer1.0.downsample.0.weight"].shape == (256, 128, 1, 1)  # inplanes 128
    assert [len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)] == [3, 4, 23, 3]
    assert "layer4.2.bn3.running_var" in state


@pytest.mark.parametrize("variant", ["u2pl", "unimatch"])
def test_os8_multi_grid_of_the_configs(variant):
    cfg = OmegaConf.load(MODEL_DIR / f"deeplabv3plus_r101_{variant}.yaml")
    cfg.backbone.pretrained = "none"
    with torch.device("meta"):
        backbone = build_model(cfg, 19).backbone
    assert isinstance(backbone, ResNetV1s) and backbone.out_channels == [256, 512, 1024, 2048]
    # replace_stride_with_dilation [False, True, True] + multi-grid: layer3 1 then 2; layer4 4, 8, 16.
    assert _dilations(backbone.layer2) == [1] * 4 and backbone.layer2[0].conv2.stride == (2, 2)
    assert _dilations(backbone.layer3) == [1] + [2] * 22
    assert _dilations(backbone.layer4) == [4, 8, 16]
    for layer in (backbone.layer3, backbone.layer4):
        assert all(b.conv2.stride == (1, 1) and b.conv2.padding == b.conv2.dilation for b in layer)
        assert layer[0].downsample[0].stride == (1, 1)
    assert backbone.maxpool.ceil_mode is (variant == "u2pl")


@pytest.mark.parametrize("size, ceil, stride4", [(64, False, 16), (64, True, 17), (65, False, 17), (65, True, 17)])
def test_v1s_stage_shapes_and_ceil_mode_pool(size, ceil, stride4):
    net = ResNetV1s(50, output_stride=8, multi_grid=(1, 2, 4), width_mult=0.25, maxpool_ceil_mode=ceil)
    feats = net(torch.randn(1, 3, size, size))
    stride8 = (stride4 - 1) // 2 + 1  # layer2's stride-2 3×3 conv
    assert [tuple(f.shape[1:]) for f in feats] == [(64, stride4, stride4), (128, stride8, stride8),
                                                   (256, stride8, stride8), (512, stride8, stride8)]


def test_v1s_is_v1c_under_the_references_names():
    torch.manual_seed(0)
    v1c = ResNetV1c(50, stem_channels=(64, 64, 128), width_mult=0.25).eval()
    renamed = {k.replace("stem.7.", "bn1.").replace("stem.", "conv1."): v for k, v in v1c.state_dict().items()}
    v1s = ResNetV1s(50, width_mult=0.25).eval()
    v1s.load_state_dict(renamed)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        for a, b in zip(v1c(x), v1s(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_zero_init_residual_is_an_option():
    assert all((b.bn3.weight == 0).all() for b in ResNetV1s(50, width_mult=0.25).layer1)
    assert all((b.bn3.weight == 1).all() for b in ResNetV1s(50, width_mult=0.25, zero_init_residual=False).layer1)


def test_their_imagenet_file_loads_with_a_report(tmp_path):
    torch.manual_seed(1)
    source = ResNetV1s(50, width_mult=0.25)
    # A resnet101.pth-style file: their ResNet's keys (conv1.*, bn1.*, layer*) and the ImageNet classifier.
    state = dict(source.state_dict()) | {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    assert "conv1.6.weight" in state and "bn1.running_var" in state and not any(k.startswith("stem") for k in state)
    path = tmp_path / "resnet101.pth"
    torch.save(state, path)
    report = load_pretrained(ResNetV1s(50, width_mult=0.25), path)
    assert report["missing"] == [] and report["unexpected"] == ["fc.weight", "fc.bias"]

    cfg = _config("unimatch", pretrained=str(path))
    model = build_model(cfg, NUM_CLASSES)
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key


# --- heads and outputs ------------------------------------------------------------------------------------------

def test_u2pl_layers_at_full_width():
    cfg = OmegaConf.load(MODEL_DIR / "deeplabv3plus_r101_u2pl.yaml")
    cfg.backbone.pretrained = "none"
    with torch.device("meta"):
        model = build_model(cfg, 19, hl={"enabled": True})
    head = model.decode_head
    assert isinstance(head, ASPPPlusHead) and model.align_corners is True
    assert [m.conv.dilation[0] for m in head.aspp_modules] == [1, 12, 24, 36]
    assert head.bottleneck.conv.weight.shape == (256, 1280, 3, 3) and head.bottleneck.conv.bias is None
    assert head.c1_bottleneck.conv.weight.shape == (256, 256, 1, 1) and head.c1_bottleneck.conv.bias is not None
    assert head.fuse[0].conv.weight.shape == (256, 512, 3, 3) and head.fuse[0].conv.bias is not None
    assert head.fuse[2].conv.weight.shape == (256, 256, 3, 3) and head.conv_seg.weight.shape == (19, 256, 1, 1)
    assert head.representation[0].conv.weight.shape == (256, 512, 3, 3)
    assert head.representation[4].weight.shape == (256, 256, 1, 1)
    drops = [head.dropout, head.fuse[1], head.representation[1], head.representation[3]]
    assert all(isinstance(d, nn.Dropout2d) and d.p == 0.1 for d in drops)
    aux = model.auxiliary_head
    assert aux.convs[0].conv.weight.shape == (256, 1024, 3, 3) and aux.convs[0].conv.bias is not None
    assert isinstance(aux.dropout, nn.Dropout2d) and aux.conv_seg.weight.shape == (19, 256, 1, 1)
    assert model.hl_head.representation is None and model.hl_head.conv_seg.out_channels == 1


def test_unimatch_layers_at_full_width():
    cfg = OmegaConf.load(MODEL_DIR / "deeplabv3plus_r101_unimatch.yaml")
    cfg.backbone.pretrained = "none"
    with torch.device("meta"):
        model = build_model(cfg, 19, hl={"enabled": True})
    head = model.decode_head
    assert model.auxiliary_head is None and head.representation is None and model.align_corners is True
    assert head.bottleneck.conv.weight.shape == (256, 1280, 1, 1)  # the ASPP projection
    assert head.c1_bottleneck.conv.weight.shape == (48, 256, 1, 1) and head.c1_bottleneck.conv.bias is None
    assert head.fuse[0].conv.weight.shape == (256, 304, 3, 3) and head.fuse[2].conv.bias is None
    assert not any(isinstance(m, nn.Dropout2d) for m in model.modules())
    assert head.image_pool_last


@pytest.mark.parametrize("pool_last", [False, True])
def test_aspp_concatenation_order(pool_last):
    head = ASPPPlusHead(32, 8, NUM_CLASSES, c1_in_channels=16, dilations=(1, 2), image_pool_last=pool_last).eval()
    seen = {}
    head.bottleneck.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    x = torch.randn(2, 32, 6, 6)
    head((torch.randn(2, 16, 12, 12), x))
    pooled = resize(head.image_pool(x), x.shape[2:], False)
    block = seen["x"][:, -8:] if pool_last else seen["x"][:, :8]
    torch.testing.assert_close(block, pooled)


def test_u2pl_outputs():
    model = _model("u2pl").train()
    out = model(torch.randn(2, 3, 64, 64))
    assert set(out) == {"out", "aux", "hl", "rep"}
    # Stride 4 is 17 for 64 pixels: U2PL's max-pool rounds up.
    assert out["out"].shape == (2, NUM_CLASSES, 17, 17) and out["rep"].shape == (2, 8, 17, 17)
    assert out["aux"].shape == (2, NUM_CLASSES, 9, 9) and out["hl"].shape == (2, 1, 17, 17)
    assert set(model.eval()(torch.randn(1, 3, 64, 64))) == {"out"}
    assert model.predict(torch.randn(1, 3, 50, 70)).shape == (1, NUM_CLASSES, 50, 70)


def test_unimatch_outputs():
    model = _model("unimatch").train()
    img = torch.randn(2, 3, 64, 64)
    assert set(model(img)) == {"out", "hl"}
    out = model(img, feature_perturbation=True)
    assert set(out) == {"out", "out_fp", "hl"}
    assert out["out"].shape == out["out_fp"].shape == (2, NUM_CLASSES, 16, 16) and out["hl"].shape == (2, 1, 16, 16)
    assert set(model.eval()(img, feature_perturbation=True)) == {"out", "out_fp"}


def test_fp_clean_half_is_the_plain_forward_in_eval_mode():
    model = _model("unimatch").eval()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(img)["out"]
        out = model(img, feature_perturbation=True)
    torch.testing.assert_close(out["out"], plain)  # BN on running statistics: the halves are independent
    assert not torch.allclose(out["out_fp"], plain)


def test_fp_halves_share_the_batch_norm_in_training():
    model = _model("unimatch").train()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(img)
        perturbed = model(img, feature_perturbation=True)
    assert not torch.allclose(perturbed["out"], plain["out"])  # the decoder's BN also saw the perturbed half
    torch.testing.assert_close(perturbed["hl"], plain["hl"])  # the HL head sees the clean features only


def test_fp_is_channel_dropout_at_one_half_on_both_decoder_inputs():
    model = _model("unimatch").eval()
    head, seen = model.decode_head, {}
    head.c1_bottleneck.register_forward_pre_hook(lambda m, args: seen.update(c1=args[0]))
    head.image_pool.register_forward_pre_hook(lambda m, args: seen.update(c4=args[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64), feature_perturbation=True)
    for name in ("c1", "c4"):
        clean, perturbed = (half.flatten(2) for half in seen[name].chunk(2))  # N×C×HW
        kept = perturbed.abs().sum(2) > 0  # per image and channel
        # Whole channels are zeroed or scaled by 1 / (1 - p); about half of the non-zero ones are dropped.
        torch.testing.assert_close(perturbed[kept], clean[kept] / (1 - FP_DROPOUT))
        assert (perturbed[~kept] == 0).all()
        alive = clean.abs().sum(2) > 0
        assert 0.3 < (alive & ~kept).sum() / alive.sum() < 0.7, name


def test_fp_needs_a_head_that_has_it():
    tiny = OmegaConf.load(MODEL_DIR / "tiny" / "pspnet_r18.yaml")
    with pytest.raises(ConfigError, match="feature perturbation"):
        build_model(tiny, NUM_CLASSES)(torch.randn(1, 3, 32, 32), feature_perturbation=True)


@pytest.mark.parametrize("variant", ["u2pl", "unimatch"])
def test_hl_head_is_a_detached_one_output_copy_of_the_segmentation_path(variant):
    model = _model(variant).train()
    assert type(model.hl_head) is ASPPPlusHead and model.hl_head.conv_seg.out_channels == 1
    assert model.hl_head.representation is None
    decode_keys = {k for k in model.decode_head.state_dict() if not k.startswith("representation.")}
    assert set(model.hl_head.state_dict()) == decode_keys
    assert model.hl_head.fuse[0].conv.weight is not model.decode_head.fuse[0].conv.weight
    model(torch.randn(2, 3, 64, 64), feature_perturbation=variant == "unimatch")["hl"].sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.decode_head.parameters())
    assert model.hl_head.conv_seg.weight.grad is not None


# --- released checkpoints ---------------------------------------------------------------------------------------

# Our key prefix -> the reference's, read off their modules (u2pl/models/model_helper.py, decoder.py, base.py;
# UniMatch model/semseg/deeplabv3plus.py): the test-made checkpoints below are written in their names.
U2PL_NAMES = [("backbone.", "encoder."),
              ("decode_head.image_pool.1.conv.", "decoder.aspp.conv1.1."),
              ("decode_head.image_pool.1.bn.", "decoder.aspp.conv1.2."),
              *[(f"decode_head.aspp_modules.{i}.{part}.", f"decoder.aspp.conv{i + 2}.{j}.")
                for i in range(4) for j, part in enumerate(["conv", "bn"])],
              ("decode_head.bottleneck.conv.", "decoder.head.0."), ("decode_head.bottleneck.bn.", "decoder.head.1."),
              ("decode_head.c1_bottleneck.conv.", "decoder.low_conv.0."),
              ("decode_head.c1_bottleneck.bn.", "decoder.low_conv.1."),
              ("decode_head.fuse.0.conv.", "decoder.classifier.0."),
              ("decode_head.fuse.0.bn.", "decoder.classifier.1."),
              ("decode_head.fuse.2.conv.", "decoder.classifier.4."),
              ("decode_head.fuse.2.bn.", "decoder.classifier.5."),
              ("decode_head.conv_seg.", "decoder.classifier.8."),
              ("decode_head.representation.0.conv.", "decoder.representation.0."),
              ("decode_head.representation.0.bn.", "decoder.representation.1."),
              ("decode_head.representation.2.conv.", "decoder.representation.4."),
              ("decode_head.representation.2.bn.", "decoder.representation.5."),
              ("decode_head.representation.4.", "decoder.representation.8."),
              ("auxiliary_head.convs.0.conv.", "auxor.aux.0."), ("auxiliary_head.convs.0.bn.", "auxor.aux.1."),
              ("auxiliary_head.conv_seg.", "auxor.aux.4.")]
UNIMATCH_NAMES = [("backbone.", "backbone."),
                  *[(f"decode_head.aspp_modules.{i}.{part}.", f"head.b{i}.{j}.")
                    for i in range(4) for j, part in enumerate(["conv", "bn"])],
                  ("decode_head.image_pool.1.conv.", "head.b4.gap.1."),
                  ("decode_head.image_pool.1.bn.", "head.b4.gap.2."),
                  ("decode_head.bottleneck.conv.", "head.project.0."),
                  ("decode_head.bottleneck.bn.", "head.project.1."),
                  ("decode_head.c1_bottleneck.conv.", "reduce.0."), ("decode_head.c1_bottleneck.bn.", "reduce.1."),
                  ("decode_head.fuse.0.conv.", "fuse.0."), ("decode_head.fuse.0.bn.", "fuse.1."),
                  ("decode_head.fuse.2.conv.", "fuse.3."), ("decode_head.fuse.2.bn.", "fuse.4."),
                  ("decode_head.conv_seg.", "classifier.")]


def _their_names(state, names, prefix=""):
    out = {}
    for key, value in state.items():
        ours, theirs = next((o, t) for o, t in names if key.startswith(o))
        out[prefix + theirs + key[len(ours):]] = value
    return out


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_reference_key_spot_checks():
    u2pl = map_checkpoint_keys({k: torch.zeros(1) for k in [
        "module.encoder.conv1.6.weight", "module.encoder.bn1.running_mean", "module.decoder.aspp.conv1.2.bias",
        "module.decoder.aspp.conv5.0.weight", "module.decoder.classifier.8.bias", "module.auxor.aux.0.bias"]})
    assert list(u2pl) == ["backbone.conv1.6.weight", "backbone.bn1.running_mean", "decode_head.image_pool.1.bn.bias",
                          "decode_head.aspp_modules.3.conv.weight", "decode_head.conv_seg.bias",
                          "auxiliary_head.convs.0.conv.bias"]
    unimatch = map_checkpoint_keys({k: torch.zeros(1) for k in [
        "backbone.layer4.2.conv2.weight", "head.b4.gap.1.weight", "head.project.1.running_var", "fuse.3.weight",
        "classifier.bias"]})
    assert list(unimatch) == ["backbone.layer4.2.conv2.weight", "decode_head.image_pool.1.conv.weight",
                              "decode_head.bottleneck.bn.running_var", "decode_head.fuse.2.conv.weight",
                              "decode_head.conv_seg.bias"]


def test_u2pl_checkpoint_teacher_by_default_student_on_request(tmp_path):
    student, teacher = _model("u2pl", hl=False, seed=1), _model("u2pl", hl=False, seed=2)
    ddp = "module."  # train_semi.py saves the DDP-wrapped models
    torch.save({"epoch": 3, "model_state": _their_names(student.state_dict(), U2PL_NAMES, ddp),
                "teacher_state": _their_names(teacher.state_dict(), U2PL_NAMES, ddp), "best_miou": 0.5,
                "optimizer_state": {"state": {}, "param_groups": []}}, tmp_path / "ckpt_best.pth")
    target = _model("u2pl", hl=False, seed=3)
    report = load_checkpoint(target, tmp_path / "ckpt_best.pth")
    assert not report["missing"] and not report["unexpected"]
    _assert_same(target, teacher)
    load_checkpoint(target, tmp_path / "ckpt_best.pth", which="student")
    _assert_same(target, student)
    load_checkpoint(target, tmp_path / "ckpt_best.pth", which="teacher")
    _assert_same(target, teacher)
    with pytest.raises(ValueError, match="which"):
        load_checkpoint(target, tmp_path / "ckpt_best.pth", which="ema")

    with_hl = _model("u2pl", hl=True, seed=4)  # the released model has no HL branch: reported, not an error
    report = load_checkpoint(with_hl, tmp_path / "ckpt_best.pth")
    assert report["missing"] and all(k.startswith("hl_head.") for k in report["missing"])


@pytest.mark.parametrize("release", ["original", "cvpr"])
def test_unimatch_checkpoint(tmp_path, release):
    source, target = _model("unimatch", hl=False, seed=1), _model("unimatch", hl=False, seed=2)
    theirs = _their_names(source.state_dict(), UNIMATCH_NAMES)
    # Original unimatch.py saves model.module.state_dict(); the CVPR version {"model": model.state_dict(), ...}.
    ckpt = theirs if release == "original" else {"model": {f"module.{k}": v for k, v in theirs.items()}, "epoch": 1}
    torch.save(ckpt, tmp_path / "best.pth")
    report = load_checkpoint(target, tmp_path / "best.pth")
    assert not report["missing"] and not report["unexpected"]
    _assert_same(target, source)
    with pytest.raises(BadFileError, match="no teacher"):
        load_checkpoint(target, tmp_path / "best.pth", which="teacher")


@pytest.mark.parametrize("variant", ["u2pl", "unimatch"])
def test_hlbench_checkpoints_of_these_models_keep_their_keys(tmp_path, variant):
    source, target = _model(variant, seed=1), _model(variant, seed=2)
    torch.save({"model": source.state_dict()}, tmp_path / "ours.pth")
    report = load_checkpoint(target, tmp_path / "ours.pth")
    assert not report["missing"] and not report["unexpected"]
    _assert_same(target, source)
