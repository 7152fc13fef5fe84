"""ResNet backbones: shapes, strides, mmseg key names, dilation patterns; load_pretrained."""

import pytest
import torch
import torchvision

from hlbench.errors import BadFileError, ConfigError
from hlbench.models import build_model, load_pretrained
from hlbench.models.resnet import ResNetV1c, TorchvisionResNet


def _tiny_cfg():
    return {"backbone": {"type": "resnet_v1c", "depth": 18, "width_mult": 0.25, "pretrained": "none"},
            "head": {"type": "psp", "channels": 16, "in_index": 3}}


def _block_counts(state_dict):
    return [len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{i}.")}) for i in range(1, 5)]


def _strided_convs(layer):
    """The 3×3 conv of each block that carries stride / dilation (conv2 in bottlenecks, conv1 in basic blocks)."""
    return [b.conv2 if hasattr(b, "conv3") else b.conv1 for b in layer]


@pytest.mark.parametrize("depth, channels", [(18, [16, 32, 64, 128]), (50, [64, 128, 256, 512])])
@pytest.mark.parametrize("output_stride, strides", [(8, [4, 8, 8, 8]), (16, [4, 8, 16, 16])])
def test_v1c_stage_shapes(depth, channels, output_stride, strides):
    net = ResNetV1c(depth, output_stride=output_stride, width_mult=0.25)
    feats = net(torch.randn(2, 3, 64, 64))
    assert net.out_channels == channels
    assert [tuple(f.shape) for f in feats] == [(2, c, 64 // s, 64 // s) for c, s in zip(channels, strides)]


def test_v1c_key_names_match_mmseg():
    with torch.device("meta"):
        sd50 = ResNetV1c(50).state_dict()
        sd101 = ResNetV1c(101).state_dict()
        sd18 = ResNetV1c(18).state_dict()
    for key in ["stem.0.weight", "stem.1.weight", "stem.3.weight", "stem.4.running_mean", "stem.6.weight",
                "stem.7.running_var", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight",
                "layer1.0.bn3.num_batches_tracked", "layer4.2.conv3.weight", "layer4.2.bn3.bias"]:
        assert key in sd50, key
    assert {k.split(".")[0] for k in sd50} == {"stem", "layer1", "layer2", "layer3", "layer4"}
    assert sd50["stem.0.weight"].shape == (32, 3, 3, 3) and sd50["stem.6.weight"].shape == (64, 32, 3, 3)
    assert sd50["layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1)
    assert _block_counts(sd50) == [3, 4, 6, 3]
    assert _block_counts(sd101) == [3, 4, 23, 3] and "layer3.22.conv3.weight" in sd101
    assert _block_counts(sd18) == [2, 2, 2, 2]
    assert "layer1.0.conv2.weight" in sd18 and not any("conv3" in k for k in sd18)
    assert "layer1.0.downsample.0.weight" not in sd18  # 64 -> 64, stride 1: identity shortcut as in mmseg


def test_v1c_wide_stem_of_u2pl_unimatch():
    with torch.device("meta"):
        sd = ResNetV1c(101, stem_channels=(64, 64, 128)).state_dict()
    assert sd["stem.0.weight"].shape == (64, 3, 3, 3) and sd["stem.6.weight"].shape == (128, 64, 3, 3)
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 128, 1, 1)


def test_v1c_dilations_os8_contract_and_multi_grid():
    net = ResNetV1c(50, output_stride=8, width_mult=0.25)
    assert [c.dilation[0] for c in _strided_convs(net.layer3)] == [1, 2, 2, 2, 2, 2]
    assert [c.dilation[0] for c in _strided_convs(net.layer4)] == [2, 4, 4]
    assert all(c.stride == (1, 1) and c.padding == c.dilation for c in _strided_convs(net.layer4))
    assert net.layer4[0].downsample[0].stride == (1, 1)
    plain = ResNetV1c(50, output_stride=8, contract_dilation=False, width_mult=0.25)
    assert [c.dilation[0] for c in _strided_convs(plain.layer4)] == [4, 4, 4]
    grid = ResNetV1c(50, output_stride=8, multi_grid=(1, 2, 4), width_mult=0.25)
    assert [c.dilation[0] for c in _strided_convs(grid.layer4)] == [4, 8, 16]
    assert [c.dilation[0] for c in _strided_convs(grid.layer3)] == [1, 2, 2, 2, 2, 2]


def test_v1c_dilations_os16_and_basic_block():
    net = ResNetV1c(50, output_stride=16, width_mult=0.25)
    assert net.layer3[0].conv2.stride == (2, 2)
    assert [c.dilation[0] for c in _strided_convs(net.layer4)] == [1, 2, 2]
    r18 = ResNetV1c(18, output_stride=8, width_mult=0.25)
    assert [b.conv1.dilation[0] for b in r18.layer4] == [2, 4]
    assert [b.conv2.dilation[0] for b in r18.layer4] == [1, 1]  # mmseg BasicBlock dilates conv1 only


@pytest.mark.parametrize("kwargs, match", [({"depth": 42}, "depth"), ({"output_stride": 4}, "output_stride"),
                                           ({"multi_grid": (1, 2)}, "multi_grid"),
                                           ({"stem_channels": (32, 64)}, "stem_channels")])
def test_v1c_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ResNetV1c(**{"depth": 50, "width_mult": 0.25, **kwargs})


@pytest.mark.parametrize("depth, channels", [(18, [64, 128, 256, 512]), (50, [256, 512, 1024, 2048])])
@pytest.mark.parametrize("output_stride, strides", [(8, [4, 8, 8, 8]), (16, [4, 8, 16, 16])])
def test_torchvision_stage_shapes(depth, channels, output_stride, strides):
    net = TorchvisionResNet(depth, output_stride=output_stride)
    feats = net(torch.randn(1, 3, 64, 64))
    assert net.out_channels == channels
    assert [tuple(f.shape) for f in feats] == [(1, c, 64 // s, 64 // s) for c, s in zip(channels, strides)]
    keys = net.state_dict()
    assert "conv1.weight" in keys and "layer1.0.bn1.weight" in keys and not any(k.startswith("fc.") for k in keys)


def test_torchvision_dilation_equals_replace_stride_with_dilation():
    torch.manual_seed(0)
    ours = TorchvisionResNet(50, output_stride=8).eval()
    ref = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True]).eval()
    assert ref.load_state_dict(ours.state_dict(), strict=False).missing_keys == ["fc.weight", "fc.bias"]
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        expected = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
        torch.testing.assert_close(ours(x)[3], expected)


def test_torchvision_rejects_width_mult():
    with pytest.raises(ConfigError, match="width_mult"):
        TorchvisionResNet(18, width_mult=0.25)


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_load_pretrained_mmseg_checkpoint_and_report(tmp_path):
    src = ResNetV1c(18, width_mult=0.25)
    ckpt = {"state_dict": {f"backbone.{k}": v for k, v in src.state_dict().items()}, "meta": {"iter": 1}}
    ckpt["state_dict"]["decode_head.conv_seg.weight"] = torch.zeros(3, 8, 1, 1)
    dst = ResNetV1c(18, width_mult=0.25)
    report = load_pretrained(dst, _save(ckpt, tmp_path / "seg.pth"))
    assert report["missing"] == [] and report["unexpected"] == ["decode_head.conv_seg.weight"]
    assert "stem.0.weight" in report["loaded"]
    torch.testing.assert_close(dst.stem[0].weight, src.stem[0].weight)


def test_load_pretrained_raw_ddp_state_dict(tmp_path):
    src = ResNetV1c(18, width_mult=0.25)
    raw = {f"module.{k}": v for k, v in src.state_dict().items()} | {"module.fc.weight": torch.zeros(2, 2)}
    dst = ResNetV1c(18, width_mult=0.25)
    assert load_pretrained(dst, _save(raw, tmp_path / "raw.pth"))["unexpected"] == ["fc.weight"]
    torch.testing.assert_close(dst.layer4[1].conv2.weight, src.layer4[1].conv2.weight)


def test_load_pretrained_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(ResNetV1c(18, width_mult=0.25), missing)
    wide_stem = ResNetV1c(18, stem_channels=(64, 64, 128), width_mult=0.25).state_dict()
    with pytest.raises(BadFileError, match="shape"):
        load_pretrained(ResNetV1c(18, width_mult=0.25), _save(wide_stem, tmp_path / "wide.pth"))
    torchvision_keys = TorchvisionResNet(18).state_dict()
    with pytest.raises(BadFileError, match="match"):
        load_pretrained(ResNetV1c(18, width_mult=0.25), _save(torchvision_keys, tmp_path / "tv.pth"))


def test_load_pretrained_expected_prefix_selects_a_submodule(tmp_path):
    model = build_model(_tiny_cfg(), num_classes=3, hl={"enabled": True})
    ckpt = {"state_dict": {f"weigh_head.{k}": v + 1 for k, v in model.hl_head.state_dict().items()}}
    report = load_pretrained(model.hl_head, _save(ckpt, tmp_path / "hl.pth"), expected_prefix="weigh_head.")
    assert report["missing"] == [] and report["unexpected"] == []
    torch.testing.assert_close(model.hl_head.conv_seg.bias, torch.ones(1))


def test_build_model_loads_backbone_pretrained(tmp_path):
    src = ResNetV1c(18, width_mult=0.25)
    cfg = _tiny_cfg()
    cfg["backbone"]["pretrained"] = str(_save(src.state_dict(), tmp_path / "r18.pth"))
    model = build_model(cfg, num_classes=3)
    torch.testing.assert_close(model.backbone.layer2[0].conv1.weight, src.layer2[0].conv1.weight)
