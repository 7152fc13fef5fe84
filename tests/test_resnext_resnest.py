"""ResNeXt and ResNeSt backbones: shapes, strides and dilations, mmseg key names, the split attention."""

from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from hlbench.errors import ConfigError
from hlbench.models import build_model
from hlbench.models.heads import ProjectedHead
from hlbench.models.resnest import ResNeSt, SplitAttentionConv2d
from hlbench.models.resnet import ResNeXt

MODEL_DIR = Path(__file__).resolve().parents[1] / "hlbench" / "conf" / "model"


def _sizes(feats):
    return [tuple(f.shape) for f in feats]


def test_resnext_equals_torchvision_resnext_dilated():
    """ResNeXt is torchvision's ResNeXt (keys and maths) with replace_stride_with_dilation for OS8."""
    torch.manual_seed(0)
    ours = ResNeXt(50, groups=32, base_width=4, output_stride=8).eval()
    ref = torchvision.models.resnext50_32x4d(weights=None, replace_stride_with_dilation=[False, True, True]).eval()
    assert ref.load_state_dict(ours.state_dict(), strict=False).missing_keys == ["fc.weight", "fc.bias"]
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        expected = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
        feats = ours(x)
    torch.testing.assert_close(feats[3], expected)
    assert ours.out_channels == [256, 512, 1024, 2048]
    assert _sizes(feats)[1:] == [(1, c, 5, 5) for c in (512, 1024, 2048)]


def test_resnext_64x4d_widths_and_keys():
    with torch.device("meta"):
        sd = ResNeXt(101, groups=64, base_width=4).state_dict()
    assert sd["conv1.weight"].shape == (64, 3, 7, 7) and "bn1.running_mean" in sd
    # 3×3 width = planes · 4/64 · 64 groups: 256 (4 per group) in layer1, 2048 (32 per group) in layer4.
    assert sd["layer1.0.conv2.weight"].shape == (256, 4, 3, 3) and sd["layer4.2.conv2.weight"].shape == (2048, 32, 3, 3)
    assert sd["layer3.22.conv3.weight"].shape == (1024, 1024, 1, 1) and "layer1.0.downsample.1.weight" in sd


def test_resnext_tiny_strides_and_dilations():
    net = ResNeXt(50, groups=4, base_width=16, output_stride=8, width_mult=0.25)
    assert _sizes(net(torch.randn(2, 3, 64, 64))) == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 8, 8), (2, 512, 8, 8)]
    assert [b.conv2.dilation[0] for b in net.layer4] == [2, 4, 4] and net.layer4[0].conv2.stride == (1, 1)
    assert net.layer1[0].conv2.groups == 4 and net.layer1[0].conv2.in_channels == 16
    with pytest.raises(ConfigError, match="depth"):
        ResNeXt(18)
    with pytest.raises(ConfigError, match="one channel per group"):
        ResNeXt(101, groups=64, base_width=4, width_mult=0.125)


def test_resnest_tiny_shapes_and_keys():
    net = ResNeSt(50, width_mult=0.25, output_stride=32)
    assert _sizes(net(torch.randn(2, 3, 65, 65))) == [(2, 64, 17, 17), (2, 128, 9, 9), (2, 256, 5, 5), (2, 512, 3, 3)]
    keys = net.state_dict()
    for key in ["stem.0.weight", "stem.4.running_var", "stem.7.bias", "layer1.0.conv1.weight", "layer1.0.bn1.weight",
                "layer1.0.conv2.conv.weight", "layer1.0.conv2.bn0.weight", "layer1.0.conv2.fc1.bias",
                "layer1.0.conv2.bn1.running_mean", "layer1.0.conv2.fc2.weight", "layer1.0.bn3.weight",
                "layer1.0.downsample.1.weight", "layer4.0.downsample.2.running_var"]:
        assert key in keys, key
    assert not any(".bn2." in k or "downsample.0." in k for k in keys)  # no bn2; the shortcut's pool has no weights
    # radix 2: the 3×3 conv makes two splits in two groups; attention bottleneck max(16·2/4, 32) = 32.
    assert keys["layer1.0.conv2.conv.weight"].shape == (32, 8, 3, 3)
    assert keys["layer1.0.conv2.fc1.weight"].shape[0] == 32


def test_resnest_stride_on_the_avg_pool_and_dilation():
    net = ResNeSt(50, width_mult=0.25, output_stride=8)
    first = net.layer2[0]
    assert first.conv2.conv.stride == (1, 1) and isinstance(first.avd_layer, torch.nn.AvgPool2d)
    assert first.downsample[0].stride == 2 and first.downsample[1].stride == (1, 1)
    assert isinstance(net.layer2[1].avd_layer, torch.nn.Identity)
    assert [b.conv2.conv.dilation[0] for b in net.layer4] == [2, 4, 4]
    assert _sizes(net(torch.randn(2, 3, 64, 64)))[3] == (2, 512, 8, 8)


def test_split_attention_softmax_over_radix():
    """With constant attention logits the weights are 1/radix each: the output is the mean of the splits."""
    torch.manual_seed(0)
    sa = SplitAttentionConv2d(8, 8, radix=2).eval()
    torch.nn.init.zeros_(sa.fc2.weight)
    torch.nn.init.zeros_(sa.fc2.bias)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        splits = sa.relu(sa.bn0(sa.conv(x))).view(2, 2, 8, 5, 5)
        torch.testing.assert_close(sa(x), splits.mean(1))


@pytest.mark.parametrize("name, backbone", [
    ("upernet_resnext101", {"depth": 50, "groups": 4, "base_width": 16}),  # 64x4d at width 1/8 would be 0 wide
    ("upernet_resnest101", {"depth": 50})])
@pytest.mark.parametrize("head_channels", [None, 8])
def test_upernet_configs_with_the_hl_copy_and_the_light_head(name, backbone, head_channels):
    cfg = OmegaConf.load(MODEL_DIR / f"{name}.yaml")
    cfg.backbone.update(pretrained="none", width_mult=0.125, **backbone)
    cfg.head.channels, cfg.aux.channels = 16, 8
    model = build_model(cfg, num_classes=3, hl={"enabled": True, "head_channels": head_channels}).train()
    out = model(torch.randn(2, 3, 33, 33))
    assert out["out"].shape[1] == 3 and out["hl"].shape == (2, 1, *out["out"].shape[2:])
    assert isinstance(model.hl_head, ProjectedHead) == (head_channels is not None)
