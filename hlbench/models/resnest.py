"""mmseg's ResNeSt (Split-Attention Networks, Zhang et al. 2020): ResNetV1d, that is the deep stem and average-pool
shortcuts, with split-attention bottlenecks; state-dict keys match mmseg's."""

import torch.nn as nn
import torch.nn.functional as F

from hlbench.errors import ConfigError
from hlbench.models.resnet import ARCHS, StagedResNet, deep_stem, scaled_width


class SplitAttentionConv2d(nn.Module):
    """A 3×3 conv producing `radix` splits of `channels` each, mixed by a per-channel softmax over the splits whose
    weights come from the global average of their sum (fc1 -> BN -> ReLU -> fc2). Cardinality 1. Keys conv, bn0,
    fc1, bn1, fc2 as mmseg's; fc1 and fc2 keep their biases as there."""

    def __init__(self, in_channels, channels, stride=1, dilation=1, radix=2, reduction_factor=4):
        super().__init__()
        # mmseg sizes the attention bottleneck from the conv's input width, with a floor of 32.
        inter_channels = max(in_channels * radix // reduction_factor, 32)
        self.radix = radix
        self.conv = nn.Conv2d(in_channels, channels * radix, 3, stride, padding=dilation, dilation=dilation,
                              groups=radix, bias=False)
        self.bn0 = nn.BatchNorm2d(channels * radix)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(channels, inter_channels, 1)
        self.bn1 = nn.BatchNorm2d(inter_channels)
        self.fc2 = nn.Conv2d(inter_channels, channels * radix, 1)

    def _attention_logits(self, x):
        return self.fc2(self.relu(self.bn1(self.fc1(F.adaptive_avg_pool2d(x, 1)))))

    def forward(self, x):
        x = self.relu(self.bn0(self.conv(x)))
        if self.radix == 1:  # one split: a sigmoid gate, as in the paper's radix-1 case
            return x * self._attention_logits(x).sigmoid()
        n = x.shape[0]
        splits = x.view(n, self.radix, -1, *x.shape[2:])
        attn = self._attention_logits(splits.sum(1)).view(n, self.radix, -1).softmax(dim=1)
        return (attn[..., None, None] * splits).sum(1)


class SplitAttentionBottleneck(nn.Module):
    """ResNeSt block: 1×1 conv, split-attention 3×3 conv, then (avg_down_stride) a 3×3 average pool carrying the
    block's stride instead of the conv, then 1×1 conv. No bn2: the split-attention conv has its own BNs."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, radix=2, reduction_factor=4,
                 avg_down_stride=True):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        pool = avg_down_stride and stride > 1
        self.conv2 = SplitAttentionConv2d(planes, planes, 1 if pool else stride, dilation, radix=radix,
                                          reduction_factor=reduction_factor)
        self.avd_layer = nn.AvgPool2d(3, stride, padding=1) if pool else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.avd_layer(self.conv2(out))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNeSt(StagedResNet):
    """mmseg ResNeSt (cardinality 1, the only setting mmseg's configs use).

    Args:
        stem_channels: widths of the deep stem's three convs; mmseg's stem_channels=128 is (64, 64, 128).
        radix: splits per split-attention conv.
        reduction_factor: the attention bottleneck is radix/reduction_factor of the conv's input width (min 32).
        avg_down_stride: stride a block with an average pool after its split-attention conv (ResNeSt-"d").
        width_mult: scales every width (minimum 8), e.g. 0.25 for CPU tests.

    No zero init of the blocks' last BN: mmseg's zero init tests `block is Bottleneck` and so skips ResNeSt's.
    """

    def __init__(self, depth=101, stem_channels=(64, 64, 128), radix=2, reduction_factor=4, avg_down_stride=True,
                 output_stride=32, contract_dilation=True, width_mult=1.0):
        super().__init__()
        if depth not in (50, 101):
            raise ConfigError(f"resnest depth must be 50 or 101, got {depth}")
        if len(stem_channels) != 3:
            raise ConfigError(f"stem_channels needs three widths, got {list(stem_channels)}")
        s1, s2, s3 = (scaled_width(c, width_mult) for c in stem_channels)
        self.stem = deep_stem(s1, s2, s3)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self._add_stages(SplitAttentionBottleneck, ARCHS[depth][1], s3, output_stride, contract_dilation, width_mult,
                         avg_down=True, radix=radix, reduction_factor=reduction_factor,
                         avg_down_stride=avg_down_stride)
        self._init_weights(zero_init_residual=False)

    def _stem(self, x):
        return self.stem(x)
