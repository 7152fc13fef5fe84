"""Decode heads (FCN, PSP, ASPP, DeepLabV3+, UPerNet, OCR + cascade) with mmseg's attribute and key names, and the
plain-conv DeepLabV3+ of U2PL and UniMatch."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from hlbench.errors import ConfigError


def resize(x, size, align_corners):
    """Bilinear resize to `size` (H, W); a no-op when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class ConvBN(nn.Module):
    """mmseg ConvModule with BN and no activation: keys `conv.weight`, `bn.*`; the conv has a bias only if asked
    (U2PL's).

    Args:
        padding: None pads to keep the size; PSANet's `proj` is a 1×1 conv with padding 1.
    """

    def __init__(self, cin, cout, kernel_size=1, dilation=1, groups=1, bias=False, padding=None):
        super().__init__()
        padding = dilation * (kernel_size // 2) if padding is None else padding
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=padding, dilation=dilation, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")  # mmcv ConvModule default

    def forward(self, x):
        return self.bn(self.conv(x))


class ConvBNReLU(ConvBN):
    """mmseg ConvModule with BN + ReLU (keys as ConvBN's)."""

    def __init__(self, cin, cout, kernel_size=1, dilation=1, groups=1, bias=False, padding=None):
        super().__init__(cin, cout, kernel_size, dilation, groups, bias, padding)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(super().forward(x))


class SeparableConvBNReLU(nn.Module):
    """mmseg DepthwiseSeparableConvModule: `depthwise_conv` (3×3, groups=cin) then `pointwise_conv` (1×1)."""

    def __init__(self, cin, cout, kernel_size=3, dilation=1):
        super().__init__()
        self.depthwise_conv = ConvBNReLU(cin, cin, kernel_size, dilation, groups=cin)
        self.pointwise_conv = ConvBNReLU(cin, cout, 1)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class DecodeHead(nn.Module):
    """Shared tail of every head: Dropout2d then the 1×1 classifier `conv_seg`.

    Args:
        in_index: which backbone stage (index into the feature tuple) the head reads.
        input_transform: "resize_concat" (mmseg's, for HRNet) reads the stages of a list in_index resized to the
            first one's size and concatenated, so in_channels is their sum; only heads listing it in
            INPUT_TRANSFORMS read their input through `head_input`.
    """

    INPUT_TRANSFORMS = (None,)

    def __init__(self, in_channels, channels, num_classes, dropout=0.1, in_index=-1, align_corners=False,
                 input_transform=None):
        super().__init__()
        if input_transform not in self.INPUT_TRANSFORMS:
            raise ConfigError(f"{type(self).__name__}: input_transform must be one of {list(self.INPUT_TRANSFORMS)}, "
                              f"got {input_transform!r}")
        if input_transform == "resize_concat":
            if not isinstance(in_index, (list, tuple)):
                raise ConfigError(f"{type(self).__name__}: input_transform resize_concat needs a list in_index, got "
                                  f"{in_index!r}")
            in_channels = sum(in_channels)
        self.in_channels, self.channels, self.num_classes = in_channels, channels, num_classes
        self.in_index, self.align_corners, self.input_transform = in_index, align_corners, input_transform
        self.dropout = _dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        # mmseg BaseDecodeHead init: Normal(0, 0.01), bias 0, so an HL head copy starts with D ≈ 0.
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def classify(self, feat):
        return self.conv_seg(self.dropout(feat))

    def head_input(self, inputs):
        """The stage in_index, or with resize_concat the stages of in_index concatenated at the first's size."""
        if self.input_transform is None:
            return inputs[self.in_index]
        size = inputs[self.in_index[0]].shape[2:]
        return torch.cat([resize(inputs[i], size, self.align_corners) for i in self.in_index], dim=1)

    def outputs(self, inputs, feature_perturbation=False):
        """The head's training outputs as a dict: {"out"}; ASPPPlusHead adds U2PL's "rep" and UniMatch's "out_fp"."""
        if feature_perturbation:
            raise ConfigError(f"{type(self).__name__} has no feature perturbation; UniMatch's needs head type "
                              "aspp_plus")
        return {"out": self(inputs)}


def _dropout2d(p):
    return nn.Dropout2d(p) if p > 0 else nn.Identity()


class FCNHead(DecodeHead):
    """FCN head: `num_convs` convs (`convs`), optionally concatenated with the input (`conv_cat`).

    Args:
        kernel_size: of the convs; the HRNet configs use 1.
        conv_bias: give the `convs` a bias before their BN, as U2PL's aux head (u2pl/models/decoder.py Aux_Module).
    """

    INPUT_TRANSFORMS = (None, "resize_concat")

    def __init__(self, in_channels, channels, num_classes, num_convs=2, concat_input=True, dilation=1, conv_bias=False,
                 kernel_size=3, **kwargs):
        super().__init__(in_channels, channels, num_classes, **kwargs)
        in_channels = self.in_channels
        if num_convs == 0 and in_channels != channels:
            raise ConfigError(f"FCN head with num_convs=0 needs in_channels == channels, got {in_channels}, {channels}")
        convs = [ConvBNReLU(in_channels if i == 0 else channels, channels, kernel_size, dilation, bias=conv_bias)
                 for i in range(num_convs)]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        self.concat_input = concat_input
        if concat_input:
            self.conv_cat = ConvBNReLU(in_channels + channels, channels, kernel_size)

    def forward(self, inputs):
        x = self.head_input(inputs)
        out = self.convs(x)
        if self.concat_input:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.classify(out)


def pyramid_pooling_modules(in_channels, channels, pool_scales):
    """mmseg PPM: per scale an adaptive average pool then a 1×1 ConvBNReLU (keys `<i>.1.conv.weight`)."""
    return nn.ModuleList(
        nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels, channels, 1)) for s in pool_scales)


def pyramid_pool(modules, x, align_corners):
    """x concatenated with every pooled branch upsampled back to x's size."""
    return torch.cat([x, *(resize(m(x), x.shape[2:], align_corners) for m in modules)], dim=1)


class PSPHead(DecodeHead):
    """PSPNet head: pyramid pooling (`psp_modules`) + 3×3 `bottleneck` over the input and pooled maps."""

    def __init__(self, in_channels, channels, num_classes, pool_scales=(1, 2, 3, 6), **kwargs):
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.psp_modules = pyramid_pooling_modules(in_channels, channels, pool_scales)
        self.bottleneck = ConvBNReLU(in_channels + len(pool_scales) * channels, channels, 3)

    def forward(self, inputs):
        x = inputs[self.in_index]
        return self.classify(self.bottleneck(pyramid_pool(self.psp_modules, x, self.align_corners)))


class ASPPHead(DecodeHead):
    """DeepLabV3 head: `image_pool` + one `aspp_modules` branch per dilation (1×1 at dilation 1) + `bottleneck`.

    Args:
        bottleneck_kernel: of the conv fusing the branches: mmseg and U2PL 3, UniMatch 1 (its ASPP projection).
        image_pool_last: concatenate the image-pool branch after the others (UniMatch) instead of first.
    """

    def __init__(self, in_channels, channels, num_classes, dilations=(1, 6, 12, 18), bottleneck_kernel=3,
                 image_pool_last=False, **kwargs):
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNReLU(in_channels, channels, 1))
        self.aspp_modules = nn.ModuleList(self._branch(in_channels, channels, d) for d in dilations)
        self.bottleneck = ConvBNReLU((len(dilations) + 1) * channels, channels, bottleneck_kernel)
        self.image_pool_last = image_pool_last

    def _branch(self, cin, cout, dilation):
        return ConvBNReLU(cin, cout, 1) if dilation == 1 else ConvBNReLU(cin, cout, 3, dilation)

    def aspp(self, x):
        pooled = resize(self.image_pool(x), x.shape[2:], self.align_corners)
        branches = [m(x) for m in self.aspp_modules]
        branches = [*branches, pooled] if self.image_pool_last else [pooled, *branches]
        return self.bottleneck(torch.cat(branches, dim=1))

    def forward(self, inputs):
        return self.classify(self.aspp(inputs[self.in_index]))


class DepthwiseSeparableASPPHead(ASPPHead):
    """DeepLabV3+ head: separable ASPP, low-level skip `c1_bottleneck`, two separable 3×3 `sep_bottleneck` convs.

    Args:
        c1_in_index: backbone stage of the low-level skip (stage 0 = stride 4).
    """

    def __init__(self, in_channels, channels, num_classes, c1_in_channels, c1_channels=48, c1_in_index=0, **kwargs):
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.c1_in_index = c1_in_index
        self.c1_bottleneck = ConvBNReLU(c1_in_channels, c1_channels, 1)
        self.sep_bottleneck = nn.Sequential(SeparableConvBNReLU(channels + c1_channels, channels, 3),
                                            SeparableConvBNReLU(channels, channels, 3))

    def _branch(self, cin, cout, dilation):
        return ConvBNReLU(cin, cout, 1) if dilation == 1 else SeparableConvBNReLU(cin, cout, 3, dilation)

    def forward(self, inputs):
        c1 = self.c1_bottleneck(inputs[self.c1_in_index])
        out = resize(self.aspp(inputs[self.in_index]), c1.shape[2:], self.align_corners)
        return self.classify(self.sep_bottleneck(torch.cat([out, c1], dim=1)))


# UniMatch's feature perturbation drops whole channels of the decoder's inputs with this probability.
FP_DROPOUT = 0.5


class ASPPPlusHead(ASPPHead):
    """DeepLabV3+ with plain convs, as U2PL (u2pl/models/decoder.py dec_deeplabv3_plus, base.py ASPP) and UniMatch
    (model/semseg/deeplabv3plus.py) write it: ASPP and `bottleneck`, upsampled to the stride-4 skip `c1_bottleneck`,
    concatenated as [skip, ASPP], two 3×3 `fuse` convs, then `conv_seg`.

    Args:
        c1_in_channels, c1_channels, c1_in_index: the low-level skip (U2PL 256 -> 256, UniMatch 256 -> 48).
        conv_bias: the skip and fuse convs have a bias before their BN (U2PL) or none (UniMatch).
        rep_channels: U2PL's representation head, returned as "rep" in training: the fuse path again on the same
            concatenation, ending in a 1×1 conv to rep_channels. 0: none.
        dropout: Dropout2d after the bottleneck, between the two fuse convs and before conv_seg (U2PL 0.1,
            UniMatch 0).
        bottleneck_kernel, image_pool_last: see ASPPHead (U2PL 3 / first, UniMatch 1 / last).
    """

    def __init__(self, in_channels, channels, num_classes, c1_in_channels, c1_channels=48, c1_in_index=0,
                 conv_bias=False, rep_channels=0, dropout=0.1, **kwargs):
        super().__init__(in_channels, channels, num_classes, dropout=dropout, **kwargs)
        self.c1_in_index = c1_in_index
        self.c1_bottleneck = ConvBNReLU(c1_in_channels, c1_channels, 1, bias=conv_bias)
        self.fuse = nn.Sequential(*self._fuse_convs(channels + c1_channels, conv_bias, dropout))
        self.representation = None
        if rep_channels:
            self.representation = nn.Sequential(*self._fuse_convs(channels + c1_channels, conv_bias, dropout),
                                                _dropout2d(dropout), nn.Conv2d(channels, rep_channels, 1))

    def _fuse_convs(self, cin, bias, dropout):
        """Two 3×3 ConvBNReLUs with Dropout2d between them: keys `0.*` and `2.*`."""
        return [ConvBNReLU(cin, self.channels, 3, bias=bias), _dropout2d(dropout),
                ConvBNReLU(self.channels, self.channels, 3, bias=bias)]

    def _fuse_input(self, c1, x):
        skip = self.c1_bottleneck(c1)
        aspp = resize(self.dropout(self.aspp(x)), skip.shape[2:], self.align_corners)
        return torch.cat([skip, aspp], dim=1)

    def forward(self, inputs):
        return self.classify(self.fuse(self._fuse_input(inputs[self.c1_in_index], inputs[self.in_index])))

    def outputs(self, inputs, feature_perturbation=False):
        """{"out"}, "rep" in training if the head has one, and with feature_perturbation "out_fp".

        Feature perturbation is UniMatch's: the decoder runs on cat(f, Dropout2d(0.5)(f)) for both of its inputs
        (skip and ASPP), in one pass, so that in training BN normalises over the clean and the perturbed half.
        "out" is the clean half, "out_fp" the perturbed one. The dropout is applied in eval mode too: asking for
        it is the perturbation.
        """
        c1, x = inputs[self.c1_in_index], inputs[self.in_index]
        if feature_perturbation:
            c1 = torch.cat([c1, F.dropout2d(c1, FP_DROPOUT, training=True)])
            x = torch.cat([x, F.dropout2d(x, FP_DROPOUT, training=True)])
        feats = self._fuse_input(c1, x)
        out = {"out": self.classify(self.fuse(feats))}
        if self.representation is not None and self.training:
            out["rep"] = self.representation(feats)
        if not feature_perturbation:
            return out
        clean = {k: v.chunk(2)[0] for k, v in out.items()}
        return {**clean, "out_fp": out["out"].chunk(2)[1]}


class UPerHead(DecodeHead):
    """UPerNet head: PPM on the last level (`psp_modules`, `bottleneck`) + FPN (`lateral_convs`, `fpn_convs`),
    every level upsampled to the finest and fused by a 3×3 `fpn_bottleneck`.

    Args:
        in_channels: channels of each level read (list, one per entry of in_index).
        in_index: backbone stages read, finest first (mmseg: [0, 1, 2, 3]).
    """

    def __init__(self, in_channels, channels, num_classes, pool_scales=(1, 2, 3, 6), in_index=(0, 1, 2, 3),
                 **kwargs):
        if len(in_channels) != len(in_index) or len(in_index) < 2:
            raise ConfigError(f"UPerHead needs >= 2 levels with one in_channels per in_index, got {in_channels}, "
                              f"{in_index}")
        super().__init__(in_channels, channels, num_classes, in_index=list(in_index), **kwargs)
        self.psp_modules = pyramid_pooling_modules(in_channels[-1], channels, pool_scales)
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)

    def forward(self, inputs):
        levels = [inputs[i] for i in self.in_index]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, levels)]
        laterals.append(self.bottleneck(pyramid_pool(self.psp_modules, levels[-1], self.align_corners)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:], self.align_corners)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[2:]
        return self.classify(self.fpn_bottleneck(torch.cat([resize(o, size, self.align_corners) for o in outs], 1)))


class SpatialGatherModule(nn.Module):
    """OCR object regions: class-wise softmax over pixels of the coarse logits pools features to N×C×K×1."""

    def forward(self, feats, prev_logits):
        n, k = prev_logits.shape[:2]
        probs = prev_logits.reshape(n, k, -1).softmax(dim=2)               # N×K×HW
        context = probs @ feats.reshape(n, feats.shape[1], -1).transpose(1, 2)  # N×K×C
        return context.transpose(1, 2).unsqueeze(3)


def _projection(cin, cout, num_convs):
    """mmseg SelfAttentionBlock projection: one ConvBNReLU, or a Sequential of them when num_convs > 1."""
    convs = [ConvBNReLU(cin if i == 0 else cout, cout, 1) for i in range(num_convs)]
    return convs[0] if num_convs == 1 else nn.Sequential(*convs)


class ObjectAttentionBlock(nn.Module):
    """OCR pixel-region attention (mmseg ObjectAttentionBlock, scale 1): pixels query the object-region
    context, the attended context is projected back and fused with the pixels by a 1×1 `bottleneck`."""

    def __init__(self, in_channels, channels):
        super().__init__()
        self.channels = channels
        self.query_project = _projection(in_channels, channels, 2)
        self.key_project = _projection(in_channels, channels, 2)
        self.value_project = _projection(in_channels, channels, 1)
        self.out_project = _projection(channels, in_channels, 1)
        self.bottleneck = ConvBNReLU(2 * in_channels, in_channels, 1)

    def forward(self, feats, context):
        n, _, h, w = feats.shape
        query = self.query_project(feats).reshape(n, self.channels, -1).transpose(1, 2)   # N×HW×C
        key = self.key_project(context).reshape(n, self.channels, -1)                    # N×C×K
        value = self.value_project(context).reshape(n, self.channels, -1).transpose(1, 2)  # N×K×C
        attention = (query @ key * self.channels ** -0.5).softmax(dim=-1)  # mmseg matmul_norm
        attended = (attention @ value).transpose(1, 2).reshape(n, self.channels, h, w)
        return self.bottleneck(torch.cat([self.out_project(attended), feats], dim=1))


class OCRHead(DecodeHead):
    """OCRNet head, stage 1 of a cascade: 3×3 `bottleneck`, `spatial_gather_module` over the previous stage's
    logits, `object_context_block`, then `conv_seg`."""

    INPUT_TRANSFORMS = (None, "resize_concat")

    def __init__(self, in_channels, channels, num_classes, ocr_channels=256, **kwargs):
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.bottleneck = ConvBNReLU(self.in_channels, channels, 3)
        self.spatial_gather_module = SpatialGatherModule()
        self.object_context_block = ObjectAttentionBlock(channels, ocr_channels)

    def forward(self, inputs, prev_logits):
        feats = self.bottleneck(self.head_input(inputs))
        context = self.spatial_gather_module(feats, prev_logits)
        return self.classify(self.object_context_block(feats, context))


class ProjectedHead(nn.Module):
    """A head that reads 1×1-projected backbone stages: the light HL head (hl.head_channels).

    `project[i]` narrows stage i to the head's width (a ConvBNReLU), or passes it on (Identity) where the head does
    not read it or it is already as narrow. Narrowing the head's `channels` alone would leave the work it does on
    the wide backbone output: DeepLabV3+'s depthwise ASPP convs with their BN + ReLU on 2048 channels, PSPNet's
    3×3 bottleneck over 2048 + 4N inputs. Those are most of a 64-channel copy's time (docs/benchmarks.md)."""

    def __init__(self, project: nn.ModuleList, head: nn.Module):
        super().__init__()
        self.project, self.head = project, head

    @property
    def num_classes(self):
        return self.head.num_classes

    @property
    def channels(self):
        return self.head.channels

    def forward(self, inputs):
        return self.head([p(x) for p, x in zip(self.project, inputs)])


class CascadeHead(nn.ModuleList):
    """mmseg CascadeEncoderDecoder's `decode_head` list (keys `0.*`, `1.*`): each stage after the first also
    reads the previous stage's logits; calling it returns the last stage's logits."""

    @property
    def num_classes(self):
        return self[-1].num_classes

    def stages(self, inputs):
        """Logits of every stage, first to last."""
        outs = [self[0](inputs)]
        for head in self[1:]:
            outs.append(head(inputs, outs[-1]))
        return outs

    def forward(self, inputs):
        return self.stages(inputs)[-1]
