"""MobileNetV2 and MobileNetV3-Large backbones as mmseg 1.x builds them, under mmseg's state-dict keys so that its
checkpoints load as is."""

import math

import torch.nn as nn
import torch.nn.functional as F

from hlbench.errors import ConfigError


def make_divisible(value, divisor=8, min_ratio=0.9):
    """Round a width to the nearest multiple of `divisor` (at least `divisor`), going up a step where rounding down
    would lose more than 1 - min_ratio of it: the TF MobileNet rule that mmseg uses for every scaled width."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < min_ratio * value else rounded


class SamePaddingConv2d(nn.Conv2d):
    """TensorFlow's "same" padding (mmcv Conv2dAdaptivePadding): pad so that the output is ceil(input / stride), the
    odd pixel at the bottom / right. At stride 2 on an even input this differs from symmetric padding."""

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1], self.dilation[::-1]):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class ConvNormAct(nn.Module):
    """mmcv ConvModule: conv `conv`, BN `bn` (left out with norm=False), then an activation (none where act is None).

    Args:
        bias: None is mmcv's "auto", a bias exactly when there is no BN; LR-ASPP's image-pool conv has neither.
        same_padding: pad as TensorFlow's "same" at run time (SamePaddingConv2d) instead of symmetrically.
    """

    def __init__(self, cin, cout, kernel_size=1, stride=1, dilation=1, groups=1, act=nn.ReLU6, bn_eps=1e-5,
                 norm=True, bias=None, same_padding=False):
        super().__init__()
        bias = not norm if bias is None else bias
        if same_padding:
            self.conv = SamePaddingConv2d(cin, cout, kernel_size, stride, 0, dilation, groups, bias=bias)
        else:
            self.conv = nn.Conv2d(cin, cout, kernel_size, stride, dilation * (kernel_size // 2), dilation, groups,
                                  bias=bias)
        self.bn = nn.BatchNorm2d(cout, eps=bn_eps) if norm else nn.Identity()
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expansion (left out at ratio 1), 3×3 depthwise carrying stride and dilation, linear 1×1
    projection; the identity shortcut where the shape allows it. Its convs are the Sequential `conv`, as in mmseg."""

    def __init__(self, cin, cout, stride, expand_ratio, dilation=1):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        layers = [ConvNormAct(cin, hidden)] if expand_ratio != 1 else []
        layers += [ConvNormAct(hidden, hidden, 3, stride, dilation, groups=hidden),
                   ConvNormAct(hidden, cout, act=None)]
        self.conv = nn.Sequential(*layers)
        self.use_shortcut = stride == 1 and cin == cout

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_shortcut else out


# Per layer (expand ratio, width at width_mult 1, blocks), from the MobileNetV2 paper's table 2.
V2_LAYERS = ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1))


def _check_layers(strides, dilations, out_indices, num_layers):
    if len(strides) != num_layers or any(s not in (1, 2) for s in strides):
        raise ConfigError(f"mobilenet strides need {num_layers} entries, each 1 or 2, got {list(strides)}")
    if len(dilations) != num_layers or any(d < 1 for d in dilations):
        raise ConfigError(f"mobilenet dilations need {num_layers} entries, each >= 1, got {list(dilations)}")
    _check_out_indices(out_indices, num_layers)


def _check_out_indices(out_indices, num_layers):
    # Outputs come in layer order, so out_channels only matches them for increasing indices.
    indices = list(out_indices)
    if not indices or indices != sorted(set(indices)) or indices[0] < 0 or indices[-1] >= num_layers:
        raise ConfigError(f"mobilenet out_indices must be increasing layer indices in 0..{num_layers - 1}, "
                          f"got {list(out_indices)}")


class MobileNetV2(nn.Module):
    """mmseg MobileNetV2: stem `conv1` (3×3, stride 2), then `layer1`..`layer7` of inverted residuals; plain BN and
    ReLU6 (the authors' config passes no norm_cfg).

    As mmseg's `make_layer`, a layer's stride and dilation go to its first block only; the other blocks are
    undilated. This is not torchvision's or timm's output-stride conversion, which dilates the later blocks, so
    the receptive fields differ.

    Args:
        width_mult: mmseg's widen_factor; every width is scaled and rounded by `make_divisible`.
        strides, dilations: of the first block of each of the 7 layers. mmseg's "-d8": strides (1, 2, 2, 1, 1, 1, 1),
            dilations (1, 1, 1, 2, 2, 4, 4).
        out_indices: the layers (0-based) whose outputs are returned, in order.
    """

    def __init__(self, width_mult=1.0, strides=(1, 2, 2, 1, 1, 1, 1), dilations=(1, 1, 1, 2, 2, 4, 4),
                 out_indices=(1, 2, 4, 6)):
        super().__init__()
        _check_layers(strides, dilations, out_indices, len(V2_LAYERS))
        self.out_indices = tuple(out_indices)
        cin = make_divisible(32 * width_mult)
        self.conv1 = ConvNormAct(3, cin, 3, stride=2)
        widths = []
        for i, ((expand, width, blocks), stride, dilation) in enumerate(zip(V2_LAYERS, strides, dilations)):
            cout = make_divisible(width * width_mult)
            layer = [InvertedResidual(cin, cout, stride, expand, dilation)]
            layer += [InvertedResidual(cout, cout, 1, expand) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            widths.append(cout)
            cin = cout
        self.out_channels = [widths[i] for i in self.out_indices]
        init_conv_weights(self)

    def forward(self, x):
        x = self.conv1(x)
        outs = []
        for i in range(len(V2_LAYERS)):
            x = getattr(self, f"layer{i + 1}")(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)


class SqueezeExcite(nn.Module):
    """mmseg SELayer as MobileNetV3 configures it: global pool, 1×1 conv to make_divisible(C / 4) with ReLU, 1×1 conv
    back with a hard sigmoid, then a channel gate. Its convs have biases and no BN."""

    def __init__(self, channels):
        super().__init__()
        squeezed = make_divisible(channels // 4)
        self.conv1 = ConvNormAct(channels, squeezed, act=nn.ReLU, norm=False)
        self.conv2 = ConvNormAct(squeezed, channels, act=nn.Hardsigmoid, norm=False)  # mmcv HSigmoid(3, 6)

    def forward(self, x):
        return x * self.conv2(self.conv1(F.adaptive_avg_pool2d(x, 1)))


class InvertedResidualV3(nn.Module):
    """MobileNetV3 block: `expand_conv` (1×1, left out where mid == in), `depthwise_conv`, optional `se`,
    `linear_conv` (1×1, no activation); the identity shortcut where the shape allows it.

    Args:
        same_padding: the depthwise conv pads as TensorFlow's "same"; mmseg does so for the blocks built with stride 2,
            and keeps it when its output-stride surgery sets their stride to 1 (where it equals symmetric padding).
    """

    def __init__(self, cin, cout, mid, kernel_size, stride, dilation, with_se, act, bn_eps, same_padding):
        super().__init__()
        self.expand_conv = ConvNormAct(cin, mid, act=act, bn_eps=bn_eps) if mid != cin else None
        self.depthwise_conv = ConvNormAct(mid, mid, kernel_size, stride, dilation, groups=mid, act=act, bn_eps=bn_eps,
                                          same_padding=same_padding)
        self.se = SqueezeExcite(mid) if with_se else None
        self.linear_conv = ConvNormAct(mid, cout, act=None, bn_eps=bn_eps)
        self.use_shortcut = stride == 1 and cin == cout

    def forward(self, x):
        out = self.expand_conv(x) if self.expand_conv is not None else x
        out = self.depthwise_conv(out)
        if self.se is not None:
            out = self.se(out)
        out = self.linear_conv(out)
        return x + out if self.use_shortcut else out


# MobileNetV3-Large, per block (kernel, expansion width, output width, SE, activation, stride), from the paper's
# table 1. mmseg's output-stride-8 surgery then changes the blocks from layer7 on (see MobileNetV3).
V3_LARGE = ((3, 16, 16, False, nn.ReLU, 1), (3, 64, 24, False, nn.ReLU, 2), (3, 72, 24, False, nn.ReLU, 1),
            (5, 72, 40, True, nn.ReLU, 2), (5, 120, 40, True, nn.ReLU, 1), (5, 120, 40, True, nn.ReLU, 1),
            (3, 240, 80, False, nn.Hardswish, 2), (3, 200, 80, False, nn.Hardswish, 1),
            (3, 184, 80, False, nn.Hardswish, 1), (3, 184, 80, False, nn.Hardswish, 1),
            (3, 480, 112, True, nn.Hardswish, 1), (3, 672, 112, True, nn.Hardswish, 1),
            (5, 672, 160, True, nn.Hardswish, 2), (5, 960, 160, True, nn.Hardswish, 1),
            (5, 960, 160, True, nn.Hardswish, 1))
V3_LAST_WIDTH = 960
# mmseg's surgery: layer7 and layer13 lose their stride, and from layer7 (layer13) on every block, these two
# included, is dilated by 2 (4); output stride 8 instead of 32.
V3_DILATION_FROM = {7: 2, 13: 4}


class MobileNetV3(nn.Module):
    """mmseg MobileNetV3 'large' at output stride 8: stem `layer0` (3×3, stride 2, TF-"same" padding, hard swish),
    `layer1`..`layer15` (V3_LARGE), and `layer16`, a 1×1 conv to 960 with hard swish.

    Args:
        out_indices: the layers (0..16) whose outputs are returned, in order; mmseg's LR-ASPP reads (1, 3, 16):
            16 channels at stride 2, 24 at stride 4, 960 at stride 8.
        bn_eps: of every BN; the authors' config (mmseg lraspp_m-v3-d8) sets 1e-3, TensorFlow's value.
    """

    def __init__(self, out_indices=(1, 3, 16), bn_eps=1e-3):
        super().__init__()
        num_layers = len(V3_LARGE) + 2
        _check_out_indices(out_indices, num_layers)
        self.out_indices = tuple(out_indices)
        self.layer0 = ConvNormAct(3, 16, 3, stride=2, act=nn.Hardswish, bn_eps=bn_eps, same_padding=True)
        cin, widths, dilation = 16, [16], 1
        for i, (kernel, mid, cout, with_se, act, stride) in enumerate(V3_LARGE, start=1):
            dilation = V3_DILATION_FROM.get(i, dilation)
            block = InvertedResidualV3(cin, cout, mid, kernel, 1 if i in V3_DILATION_FROM else stride, dilation,
                                       with_se, act, bn_eps, same_padding=stride == 2)
            self.add_module(f"layer{i}", block)
            widths.append(cout)
            cin = cout
        # A 1×1 conv: mmseg's dilation 4 on it changes nothing.
        self.add_module(f"layer{num_layers - 1}", ConvNormAct(cin, V3_LAST_WIDTH, act=nn.Hardswish, bn_eps=bn_eps))
        widths.append(V3_LAST_WIDTH)
        self.num_layers = num_layers
        self.out_channels = [widths[i] for i in self.out_indices]
        init_conv_weights(self)

    def forward(self, x):
        outs = []
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i}")(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)


def init_conv_weights(module):
    # mmseg's MobileNet init without a checkpoint, and mmcv ConvModule's: Kaiming-normal convs (fan_out / relu),
    # zero biases; BN is already weight 1, bias 0.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
