"""MobileNet backbones: mmseg key names, widths, strides and dilation pattern; the model configs built on them with
both HL heads. Logit parity with mmseg itself is analysis/mmseg_parity.py's."""

import pytest
import torch
import torch.nn.functional as F

from hlbench.compose import compose
from hlbench.errors import ConfigError
from hlbench.models import build_model, load_pretrained
from hlbench.models.lraspp_head import LRASPPHead
from hlbench.models.mobilenet import MobileNetV2, MobileNetV3, SamePaddingConv2d, make_divisible


def _depthwise(block):
    return next(m for m in block.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1)


def test_make_divisible_rounds_as_mmseg():
    assert [make_divisible(v) for v in (32, 16, 8.4, 10, 12, 320 * 0.5)] == [32, 16, 8, 16, 16, 160]


def test_v2_key_names_and_widths_match_mmseg():
    with torch.device("meta"):
        net = MobileNetV2()
        sd = net.state_dict()
    assert net.out_channels == [24, 32, 96, 320]
    assert {k.split(".")[0] for k in sd} == {"conv1", *(f"layer{i}" for i in range(1, 8))}
    assert [len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in range(1, 8)] == \
        [1, 2, 3, 4, 3, 3, 1]
    assert sd["conv1.conv.weight"].shape == (32, 3, 3, 3) and "conv1.bn.running_var" in sd
    # Expand ratio 1 (layer1): no expansion conv, so conv.0 is the depthwise conv and conv.1 the projection.
    assert sd["layer1.0.conv.0.conv.weight"].shape == (32, 1, 3, 3) and "layer1.0.conv.2.conv.weight" not in sd
    assert sd["layer2.0.conv.0.conv.weight"].shape == (96, 16, 1, 1)
    assert sd["layer7.0.conv.2.conv.weight"].shape == (320, 960, 1, 1) and "layer7.0.conv.2.bn.bias" in sd
    assert not any(k.endswith("conv.bias") for k in sd)


def test_v2_stride_and_dilation_go_to_the_first_block_only():
    net = MobileNetV2(width_mult=0.5)
    dilations = {i: [_depthwise(b).dilation[0] for b in getattr(net, f"layer{i}")] for i in (4, 5, 6, 7)}
    assert dilations == {4: [2, 1, 1, 1], 5: [2, 1, 1], 6: [4, 1, 1], 7: [4]}
    assert [_depthwise(net.layer3[0]).stride[0], _depthwise(net.layer4[0]).stride[0]] == [2, 1]
    assert [b.use_shortcut for b in net.layer4] == [False, True, True, True]
    assert all(m.eps == 1e-5 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert sum(isinstance(m, torch.nn.ReLU6) for m in net.layer2[0].modules()) == 2  # none after the projection


def test_v2_output_strides_on_an_odd_input():
    net = MobileNetV2(width_mult=0.5).eval()
    feats = net(torch.randn(1, 3, 33, 33))
    assert net.out_channels == [16, 16, 48, 160]
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 9, 9), (16, 5, 5), (48, 5, 5), (160, 5, 5)]


@pytest.mark.parametrize("kwargs, match", [({"strides": (1, 2, 2)}, "strides"), ({"strides": (3,) * 7}, "strides"),
                                           ({"dilations": (0,) * 7}, "dilations"),
                                           ({"out_indices": (4, 2)}, "out_indices"),
                                           ({"out_indices": (7,)}, "out_indices")])
def test_v2_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MobileNetV2(**kwargs)


def test_v2_loads_an_mmcls_imagenet_checkpoint_with_a_report(tmp_path):
    # mmcls://mobilenet_v2 keeps the backbone under `backbone.` beside its classifier `head.fc`.
    source = MobileNetV2(width_mult=0.5)
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    state.update({"head.fc.weight": torch.zeros(10, 640), "head.fc.bias": torch.zeros(10)})
    torch.save({"state_dict": state, "meta": {}}, tmp_path / "mobilenet_v2.pth")
    net = MobileNetV2(width_mult=0.5)
    report = load_pretrained(net, tmp_path / "mobilenet_v2.pth")
    assert report["missing"] == [] and sorted(report["unexpected"]) == ["head.fc.bias", "head.fc.weight"]
    assert torch.equal(net.layer7[0].conv[2].conv.weight, source.layer7[0].conv[2].conv.weight)


@pytest.mark.parametrize("head_channels", [None, 8])
def test_pspnet_mobilenetv2_with_both_hl_heads(hydra_ctx, head_channels):
    cfg = compose(["model=pspnet_mobilenetv2", "model.backbone.pretrained=none",
                                       "model.backbone.width_mult=0.25", "model.head.channels=16",
                                       "model.aux.channels=8", "hl.enabled=true",
                                       f"hl.head_channels={head_channels or 'null'}"])
    model = build_model(cfg.model, num_classes=3, hl=cfg.hl).train()
    assert model.decode_head.in_channels == 80 and model.auxiliary_head.in_channels == 24  # 320 / 96 at 1/4 width
    out = model(torch.randn(2, 3, 33, 33))
    assert out["out"].shape == (2, 3, 5, 5) and out["aux"].shape == (2, 3, 5, 5) and out["hl"].shape == (2, 1, 5, 5)
    assert model.eval().predict(torch.randn(1, 3, 33, 33), mode="whole").shape == (1, 3, 33, 33)


def test_same_padding_puts_the_odd_pixel_bottom_right():
    conv = SamePaddingConv2d(1, 1, 3, stride=2, bias=False)
    even, odd = torch.randn(1, 1, 8, 6), torch.randn(1, 1, 7, 7)
    assert torch.equal(conv(even), F.conv2d(F.pad(even, [0, 1, 0, 1]), conv.weight, stride=2))
    assert torch.equal(conv(odd), F.conv2d(odd, conv.weight, stride=2, padding=1))  # odd sides: symmetric
    dilated = SamePaddingConv2d(1, 1, 5, dilation=4, bias=False)
    assert torch.equal(dilated(even), F.conv2d(even, dilated.weight, padding=8, dilation=4))


def test_v3_key_names_and_widths_match_mmseg():
    with torch.device("meta"):
        net = MobileNetV3()
        sd = net.state_dict()
    assert net.out_channels == [16, 24, 960]
    assert {k.split(".")[0] for k in sd} == {f"layer{i}" for i in range(17)}
    assert sd["layer0.conv.weight"].shape == (16, 3, 3, 3) and "layer0.conv.bias" not in sd
    assert "layer1.expand_conv.conv.weight" not in sd and sd["layer1.depthwise_conv.conv.weight"].shape == (16, 1, 3, 3)
    # SE: make_divisible(72 // 4) = 24 channels, convs with biases and no BN.
    assert sd["layer4.se.conv1.conv.weight"].shape == (24, 72, 1, 1) and "layer4.se.conv1.conv.bias" in sd
    assert not any(k.startswith("layer4.se.") and ".bn." in k for k in sd) and "layer7.se.conv1.conv.weight" not in sd
    assert sd["layer15.linear_conv.conv.weight"].shape == (160, 960, 1, 1)
    assert sd["layer16.conv.weight"].shape == (960, 160, 1, 1) and "layer16.bn.running_var" in sd


def test_v3_output_stride_8_surgery():
    net = MobileNetV3()
    depthwise = [getattr(net, f"layer{i}").depthwise_conv.conv for i in range(1, 16)]
    assert [c.stride[0] for c in depthwise] == [1, 2, 1, 2] + [1] * 11
    assert [c.dilation[0] for c in depthwise] == [1] * 6 + [2] * 6 + [4] * 3
    same = [i for i, c in enumerate(depthwise, start=1) if isinstance(c, SamePaddingConv2d)]
    assert same == [2, 4, 7, 13] and isinstance(net.layer0.conv, SamePaddingConv2d)
    assert all(c.padding[0] == c.dilation[0] * (c.kernel_size[0] // 2) for c in depthwise
               if not isinstance(c, SamePaddingConv2d))
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    feats = net.eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 32, 32), (24, 16, 16), (960, 8, 8)]


def test_lraspp_image_pool_and_bad_inputs():
    head = LRASPPHead([4, 6, 8], 8, 3, branch_channels=(2, 4))
    assert head.image_pool(torch.randn(1, 8, 64, 128)).shape == (1, 8, 1, 4)  # 1/8 of a 512×1024 crop
    out = head([torch.randn(1, 4, 196, 196), torch.randn(1, 6, 98, 98), torch.randn(1, 8, 49, 49)])
    assert out.shape == (1, 3, 196, 196)
    with pytest.raises(ConfigError, match="branch_channels"):
        LRASPPHead([4, 8], 8, 3, in_index=[0, 1], branch_channels=(2, 4))


@pytest.mark.parametrize("head_channels", [None, 8])
def test_lraspp_mobilenetv3_with_both_hl_heads(hydra_ctx, head_channels):
    cfg = compose(["model=lraspp_mobilenetv3", "model.backbone.pretrained=none",
                                       "model.head.channels=16", "hl.enabled=true",
                                       f"hl.head_channels={head_channels or 'null'}"])
    model = build_model(cfg.model, num_classes=3, hl=cfg.hl).train()
    assert model.auxiliary_head is None and model.decode_head.in_channels == [16, 24, 960]
    out = model(torch.randn(1, 3, 385, 385))  # the smallest input LR-ASPP's 49×49 image pool takes
    assert out["out"].shape == (1, 3, 193, 193) and out["hl"].shape == (1, 1, 193, 193)
