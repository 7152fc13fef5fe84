"""BiSeNetV2 (Yu et al., "BiSeNet V2: Bilateral Network with Guided Aggregation for Real-time Semantic
Segmentation", 2020) as mmseg 1.x builds it, under mmseg's state-dict keys so that its checkpoints load as is.

mmseg builds every sub-block with its own default norm (BN) and ReLU: the backbone's norm_cfg reaches none of them,
so the authors' SyncBN setting applies to the heads only and the backbone is plain BN whatever the config says.
"""

import torch
import torch.nn as nn

from hlbench.errors import ConfigError
from hlbench.models.heads import resize
from hlbench.models.mobilenet import ConvNormAct, init_conv_weights


def _conv(cin, cout, kernel_size=3, stride=1, groups=1, act=nn.ReLU, norm=True):
    """mmcv ConvModule with BiSeNetV2's ReLU (ConvNormAct's default is MobileNet's ReLU6); bias exactly without BN."""
    return ConvNormAct(cin, cout, kernel_size, stride, groups=groups, act=act, norm=norm)


class SeparableConv(nn.Module):
    """mmcv DepthwiseSeparableConvModule without activations: `depthwise_conv` (3×3 + BN) then `pointwise_conv`
    (1×1, with BN where pointwise_norm, else with a bias)."""

    def __init__(self, cin, cout, stride=1, pointwise_norm=True):
        super().__init__()
        self.depthwise_conv = _conv(cin, cin, 3, stride, groups=cin, act=None)
        self.pointwise_conv = _conv(cin, cout, 1, act=None, norm=pointwise_norm)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class DetailBranch(nn.Module):
    """Wide and shallow: per width a stride-2 3×3 conv and one (first stage) or two more 3×3 convs; stride 8."""

    def __init__(self, channels=(64, 64, 128)):
        super().__init__()
        stages, cin = [], 3
        for i, cout in enumerate(channels):
            repeats = 1 if i == 0 else 2
            stages.append(nn.Sequential(_conv(cin, cout, stride=2), *(_conv(cout, cout) for _ in range(repeats))))
            cin = cout
        self.detail_branch = nn.ModuleList(stages)

    def forward(self, x):
        for stage in self.detail_branch:
            x = stage(x)
        return x


class StemBlock(nn.Module):
    """Semantic stem, stride 4: a stride-2 conv, then a conv path (1×1 to half width, 3×3 stride 2) beside a max
    pool, concatenated and fused by a 3×3 conv."""

    def __init__(self, cout):
        super().__init__()
        self.conv_first = _conv(3, cout, stride=2)
        self.convs = nn.Sequential(_conv(cout, cout // 2, 1), _conv(cout // 2, cout, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.fuse_last = _conv(2 * cout, cout)

    def forward(self, x):
        x = self.conv_first(x)
        return self.fuse_last(torch.cat([self.convs(x), self.pool(x)], dim=1))


class GELayer(nn.Module):
    """Gather-and-expansion layer: 3×3 conv, depthwise expansion by `expansion` (at stride 2: a strided depthwise
    conv without ReLU then a second depthwise conv), linear 1×1 projection, plus the input (at stride 2 through a
    separable-conv shortcut), then ReLU. mmseg adds the ReLU after the expansion that the paper's figure omits."""

    def __init__(self, cin, cout, expansion=6, stride=1):
        super().__init__()
        mid = cin * expansion
        self.conv1 = _conv(cin, cin)
        if stride == 1:
            self.dwconv = nn.Sequential(_conv(cin, mid, groups=cin))
            self.shortcut = None
        else:
            self.dwconv = nn.Sequential(_conv(cin, mid, stride=stride, groups=cin, act=None),
                                        _conv(mid, mid, groups=mid))
            self.shortcut = nn.Sequential(SeparableConv(cin, cout, stride))
        self.conv2 = nn.Sequential(_conv(mid, cout, 1, act=None))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.conv2(self.dwconv(self.conv1(x)))
        return self.act(out + (x if self.shortcut is None else self.shortcut(x)))


class CEBlock(nn.Module):
    """Context embedding: the global average (with its own BN, `gap.1`) through a 1×1 conv, added to the input,
    then a 3×3 conv (the paper's plain conv is a conv + BN + ReLU in mmseg)."""

    def __init__(self, channels):
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(channels))
        self.conv_gap = _conv(channels, channels, 1)
        self.conv_last = _conv(channels, channels)

    def forward(self, x):
        return self.conv_last(x + self.conv_gap(self.gap(x)))


class SemanticBranch(nn.Module):
    """Narrow and deep: `stage1` the stem (stride 4), then per further width a stride-2 GE layer followed by one GE
    layer (four in the last stage), and the CE block `stage<n>_CEBlock`; stride 32. Returns every stage's output."""

    def __init__(self, channels=(16, 32, 64, 128), expansion=6):
        super().__init__()
        self.stage_names = [f"stage{i + 1}" for i in range(len(channels))] + [f"stage{len(channels)}_CEBlock"]
        self.add_module("stage1", StemBlock(channels[0]))
        for i in range(1, len(channels)):
            repeats = 3 if i == len(channels) - 1 else 1
            self.add_module(f"stage{i + 1}", nn.Sequential(
                GELayer(channels[i - 1], channels[i], expansion, stride=2),
                *(GELayer(channels[i], channels[i], expansion) for _ in range(repeats))))
        self.add_module(self.stage_names[-1], CEBlock(channels[-1]))

    def forward(self, x):
        outs = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outs.append(x)
        return outs


class BGALayer(nn.Module):
    """Bilateral guided aggregation: each branch gates the other through a sigmoid at its own resolution (detail at
    1/8 by the upsampled semantic conv, the semantic separable conv at 1/32 by the downsampled detail), the two are
    summed at 1/8 and fused by a 3×3 conv."""

    def __init__(self, channels=128, align_corners=False):
        super().__init__()
        self.align_corners = align_corners
        self.detail_dwconv = nn.Sequential(SeparableConv(channels, channels, pointwise_norm=False))
        self.detail_down = nn.Sequential(_conv(channels, channels, stride=2, act=None),
                                         nn.AvgPool2d(3, stride=2, padding=1))
        self.semantic_conv = nn.Sequential(_conv(channels, channels, act=None))
        self.semantic_dwconv = nn.Sequential(SeparableConv(channels, channels, pointwise_norm=False))
        self.conv = _conv(channels, channels)

    def forward(self, detail, semantic):
        detail_dwconv = self.detail_dwconv(detail)
        semantic_conv = resize(self.semantic_conv(semantic), detail_dwconv.shape[2:], self.align_corners)
        fuse_1 = detail_dwconv * torch.sigmoid(semantic_conv)
        fuse_2 = self.detail_down(detail) * torch.sigmoid(self.semantic_dwconv(semantic))
        return self.conv(fuse_1 + resize(fuse_2, fuse_1.shape[2:], self.align_corners))


class BiSeNetV2(nn.Module):
    """mmseg BiSeNetV2: `detail` and `semantic` branches fused by `bga`. Its outputs, as mmseg's: 0 the aggregated
    features (bga_channels, 1/8), 1-4 the semantic stages (1/4, 1/8, 1/16, 1/32) that the auxiliary heads read
    (the paper's booster); the CE block's output only feeds the aggregation.

    Args:
        detail_channels: widths of the three detail stages; the last must equal bga_channels.
        semantic_channels: widths of the stem and the GE stages; the last must equal bga_channels.
        semantic_expansion_ratio: of the GE layers.
        out_indices: which of the five outputs are returned, in this order.
        align_corners: of the aggregation's two bilinear resizes (mmseg's config: false).
    """

    def __init__(self, detail_channels=(64, 64, 128), semantic_channels=(16, 32, 64, 128), semantic_expansion_ratio=6,
                 bga_channels=128, out_indices=(0, 1, 2, 3, 4), align_corners=False):
        super().__init__()
        if not detail_channels[-1] == semantic_channels[-1] == bga_channels:
            raise ConfigError(f"bisenetv2: the last detail_channels and semantic_channels must equal bga_channels, got "
                              f"{list(detail_channels)}, {list(semantic_channels)}, {bga_channels}")
        widths = [bga_channels, *semantic_channels]
        if not out_indices or any(not 0 <= i < len(widths) for i in out_indices):
            raise ConfigError(f"bisenetv2 out_indices must be in 0..{len(widths) - 1}, got {list(out_indices)}")
        self.out_indices = tuple(out_indices)
        self.detail = DetailBranch(detail_channels)
        self.semantic = SemanticBranch(semantic_channels, semantic_expansion_ratio)
        self.bga = BGALayer(bga_channels, align_corners)
        self.out_channels = [widths[i] for i in self.out_indices]
        init_conv_weights(self)  # mmseg BiSeNetV2's default init_cfg: Kaiming convs, unit BN

    def forward(self, x):
        semantic = self.semantic(x)
        outs = [self.bga(self.detail(x), semantic[-1]), *semantic[:-1]]
        return tuple(outs[i] for i in self.out_indices)
