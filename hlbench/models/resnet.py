"""ResNet backbones returning the four stage outputs: mmseg's deep-stem ResNetV1c, the ResNetV1s of U2PL and
UniMatch, mmseg's ResNeXt, and a torchvision wrapper."""

import torch.nn as nn
import torchvision

from hlbench.errors import ConfigError

# (strides, dilations) of layer1..layer4 per output stride; OS8 / OS16 are mmseg's "-d8" / "-d16" settings.
STAGE_PATTERNS = {8: ((1, 2, 1, 1), (1, 1, 2, 4)), 16: ((1, 2, 2, 1), (1, 1, 1, 2)), 32: ((1, 2, 2, 2), (1, 1, 1, 1))}


def stage_dilations(num_blocks, dilation, contract_dilation=True, multi_grid=None):
    """Per-block dilations of one stage.

    mmseg's ResLayer gives the first block of a dilated stage dilation/2 (contract_dilation), which is also what
    torchvision's replace_stride_with_dilation does. multi_grid multiplies the stage dilation block by block
    (DeepLabV3 §3.2 and U2PL/UniMatch: dilation 4 with grids (1, 2, 4) gives 4/8/16); note that mmseg's own
    `multi_grid` takes absolute dilations instead.
    """
    if multi_grid is not None:
        if len(multi_grid) != num_blocks:
            raise ConfigError(f"multi_grid {list(multi_grid)} needs one entry per block of layer4 ({num_blocks})")
        return [dilation * g for g in multi_grid]
    first = dilation // 2 if contract_dilation and dilation > 1 else dilation
    return [first] + [dilation] * (num_blocks - 1)


def _stage_pattern(output_stride):
    if output_stride not in STAGE_PATTERNS:
        raise ConfigError(f"output_stride must be one of {sorted(STAGE_PATTERNS)}, got {output_stride}")
    return STAGE_PATTERNS[output_stride]


def _conv3x3(cin, cout, stride=1, dilation=1, groups=1):
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, groups=groups, bias=False)


class BasicBlock(nn.Module):
    """ResNet-18/34 block; like mmseg, only conv1 is dilated."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def bottleneck_width(planes, groups=1, base_width=64):
    """Width of a bottleneck's 3×3 conv: `planes` for ResNet, groups × base_width scaled by planes/64 for ResNeXt
    (64x4d: 256 in layer1 ... 2048 in layer4), rounded down as mmseg and torchvision do."""
    return planes if groups == 1 else planes * base_width // 64 * groups


class Bottleneck(nn.Module):
    """ResNet-50/101 block, "pytorch" style: the stride sits on the 3×3 conv; with groups > 1 the ResNeXt block."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        width = bottleneck_width(planes, groups, base_width)
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, dilation, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


ARCHS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
         50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3))}


def scaled_width(channels, width_mult):
    """A width scaled by width_mult (minimum 8), e.g. 0.25 for CPU smoke runs."""
    return max(8, int(round(channels * width_mult)))


def deep_stem(s1, s2, s3):
    """mmseg's deep stem (ResNetV1c / V1d): three 3×3 convs, the first with stride 2. Sequential indices 0/1, 3/4,
    6/7 are mmseg's stem.{conv,bn} keys (ReLUs at 2, 5, 8)."""
    return nn.Sequential(
        nn.Conv2d(3, s1, 3, 2, 1, bias=False), nn.BatchNorm2d(s1), nn.ReLU(inplace=True),
        _conv3x3(s1, s2), nn.BatchNorm2d(s2), nn.ReLU(inplace=True),
        _conv3x3(s2, s3), nn.BatchNorm2d(s3), nn.ReLU(inplace=True))


class StagedResNet(nn.Module):
    """What the ResNet variants share: a stem (`_stem`), a 3×3 max-pool and the stages layer1..layer4, whose
    outputs `forward` returns. It has no constructor, so build_model accepts exactly each variant's arguments."""

    def _add_stages(self, block, num_blocks, inplanes, output_stride, contract_dilation, width_mult, multi_grid=None,
                    **stage_options):
        """Add layer1..layer4 (widths 64·2^i scaled, strides and dilations of output_stride) and set out_channels;
        stage_options go to `make_stage`."""
        strides, dilations = _stage_pattern(output_stride)
        self.out_channels = []
        for i in range(4):
            grid = multi_grid if i == 3 else None
            block_dilations = stage_dilations(num_blocks[i], dilations[i], contract_dilation, grid)
            layer, inplanes = make_stage(block, inplanes, scaled_width(64 * 2**i, width_mult), strides[i],
                                         block_dilations, **stage_options)
            self.add_module(f"layer{i + 1}", layer)
            self.out_channels.append(inplanes)

    def _init_weights(self, zero_init_residual):
        # mmseg ResNet defaults: Kaiming convs, unit BN, and zero_init_residual (last BN of each block at 0).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(_last_bn(m).weight)

    def forward(self, x):
        x = self.maxpool(self._stem(x))
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return tuple(outs)


class ResNetV1c(StagedResNet):
    """mmseg ResNetV1c: deep stem of three 3×3 convs, then a 3×3 max-pool; state-dict keys match mmseg's.

    Args:
        stem_channels: widths of the three stem convs; mmseg (32, 32, 64), U2PL/UniMatch (64, 64, 128).
        multi_grid: per-block dilation multipliers of layer4 (see `stage_dilations`), or None.
        width_mult: scales every width (minimum 8), e.g. 0.25 for CPU smoke runs.
        maxpool_ceil_mode: the stem max-pool rounds up (U2PL); this changes the size after it for even inputs.
        zero_init_residual: start the last BN of each block at 0 (mmseg, U2PL; UniMatch does not).
    """

    def __init__(self, depth=50, stem_channels=(32, 32, 64), output_stride=8, contract_dilation=True,
                 multi_grid=None, width_mult=1.0, maxpool_ceil_mode=False, zero_init_residual=True):
        super().__init__()
        if depth not in ARCHS:
            raise ConfigError(f"resnet_v1c depth must be one of {sorted(ARCHS)}, got {depth}")
        if len(stem_channels) != 3:
            raise ConfigError(f"stem_channels needs three widths, got {list(stem_channels)}")
        block, num_blocks = ARCHS[depth]
        s1, s2, s3 = (scaled_width(c, width_mult) for c in stem_channels)
        self._make_stem(s1, s2, s3)
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=maxpool_ceil_mode)
        self._add_stages(block, num_blocks, s3, output_stride, contract_dilation, width_mult, multi_grid)
        self._init_weights(zero_init_residual)

    def _make_stem(self, s1, s2, s3):
        self.stem = deep_stem(s1, s2, s3)

    def _stem(self, x):
        return self.stem(x)


class ResNetV1s(ResNetV1c):
    """The ResNet of U2PL and UniMatch (u2pl/models/resnet.py, UniMatch model/backbone/resnet.py), GluonCV's "V1s":
    ResNetV1c with a 64-64-128 stem, under their state-dict keys so that their ImageNet resnet101.pth loads as is.

    Their stem keeps the three convs and the first two BNs in a Sequential `conv1` (convs at 0, 3, 6, BNs at 1, 4)
    and the last BN outside it as `bn1`; the stages are named as ours. Their OS8 multi-grid, layer4 dilations
    4/8/16, is `output_stride=8, multi_grid=(1, 2, 4)` here.
    """

    def __init__(self, depth=101, stem_channels=(64, 64, 128), **kwargs):
        super().__init__(depth, stem_channels, **kwargs)

    def _make_stem(self, s1, s2, s3):
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, s1, 3, 2, 1, bias=False), nn.BatchNorm2d(s1), nn.ReLU(inplace=True),
            _conv3x3(s1, s2), nn.BatchNorm2d(s2), nn.ReLU(inplace=True),
            _conv3x3(s2, s3))
        self.bn1 = nn.BatchNorm2d(s3)
        self.relu = nn.ReLU(inplace=True)

    def _stem(self, x):
        return self.relu(self.bn1(self.conv1(x)))


def make_stage(block, inplanes, planes, stride, dilations, avg_down=False, **block_options):
    """One residual stage; returns (stage, its output width). block_options go to every block (ResNeXt's groups).

    avg_down (ResNetV1d, ResNeSt) strides the shortcut with an average pool before a stride-1 1×1 conv. mmseg puts
    the pool in every shortcut, an identity one at stride 1, so the conv and BN are always downsample.1 and .2.
    """
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        project = [nn.Conv2d(inplanes, out, 1, 1 if avg_down else stride, bias=False), nn.BatchNorm2d(out)]
        if avg_down:
            project.insert(0, nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False))
        downsample = nn.Sequential(*project)
    blocks = [block(inplanes, planes, stride, dilations[0], downsample, **block_options)]
    blocks += [block(out, planes, 1, d, **block_options) for d in dilations[1:]]
    return nn.Sequential(*blocks), out


class ResNeXt(StagedResNet):
    """mmseg ResNeXt: ResNet's 7×7 stem (conv1, bn1) and 3×3 max-pool, then bottlenecks whose 3×3 conv has
    `groups` groups of `base_width` channels (at layer1's width; 64x4d: groups 64, base_width 4). Same keys as
    mmseg's and torchvision's ResNeXt.

    zero_init_residual is off as in mmseg, whose zero init tests `block is Bottleneck` and so skips ResNeXt's.
    """

    def __init__(self, depth=101, groups=64, base_width=4, output_stride=8, contract_dilation=True, width_mult=1.0):
        super().__init__()
        if depth not in (50, 101):
            raise ConfigError(f"resnext depth must be 50 or 101, got {depth}")
        stem = scaled_width(64, width_mult)
        if bottleneck_width(stem, groups, base_width) < groups:  # layer1's planes equal the stem width
            raise ConfigError(f"resnext: width_mult {width_mult} leaves layer1 less than one channel per group "
                              f"(groups {groups}, base_width {base_width})")
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self._add_stages(Bottleneck, ARCHS[depth][1], stem, output_stride, contract_dilation, width_mult,
                         groups=groups, base_width=base_width)
        self._init_weights(zero_init_residual=False)

    def _stem(self, x):
        return self.relu(self.bn1(self.conv1(x)))


TORCHVISION_BUILDERS = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34,
                        50: torchvision.models.resnet50, 101: torchvision.models.resnet101}


class TorchvisionResNet(nn.Module):
    """torchvision ResNet (7×7 stem, random init) with torchvision's key names and no fc layer.

    Dilation is applied to the built network instead of through `replace_stride_with_dilation`, because
    torchvision's BasicBlock rejects the latter. For Bottleneck depths the result is identical to
    torchvision's (same per-block dilations); for BasicBlock depths only conv1 is dilated, as in mmseg.
    """

    def __init__(self, depth=50, output_stride=8, contract_dilation=True, width_mult=1.0):
        super().__init__()
        if depth not in TORCHVISION_BUILDERS:
            raise ConfigError(f"torchvision_resnet depth must be one of {sorted(TORCHVISION_BUILDERS)}, got {depth}")
        if width_mult != 1.0:
            raise ConfigError(f"torchvision_resnet supports width_mult 1.0 only, got {width_mult}")
        if not contract_dilation:
            raise ConfigError("torchvision_resnet always contracts the first dilation of a stage (contract_dilation)")
        net = TORCHVISION_BUILDERS[depth](weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        _, dilations = _stage_pattern(output_stride)
        for i, layer in enumerate(self.stages()):
            if dilations[i] > 1:
                _dilate_stage(layer, stage_dilations(len(layer), dilations[i], contract_dilation))
        self.out_channels = [_last_bn(layer[-1]).num_features for layer in self.stages()]

    def stages(self):
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for layer in self.stages():
            x = layer(x)
            outs.append(x)
        return tuple(outs)


def _last_bn(block):
    """The BN closing a residual branch (bn3 in bottlenecks, bn2 in basic blocks), ours or torchvision's."""
    return block.bn3 if hasattr(block, "bn3") else block.bn2


def _dilate_stage(layer, dilations):
    """Turn a torchvision stage's stride 2 into the given per-block dilations of its strided 3×3 conv."""
    for block, d in zip(layer, dilations):
        conv = block.conv2 if isinstance(block, torchvision.models.resnet.Bottleneck) else block.conv1
        conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
