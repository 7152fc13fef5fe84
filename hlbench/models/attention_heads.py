"""The attention and context decode heads of the paper's Cityscapes architecture table (ANN, CCNet, EMANet, GCNet,
ISANet, NonLocal, PSANet), with mmseg 1.x attribute and key names, and PSANet's point-wise mask as a torch gather."""

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from hlbench.engine.distributed import all_reduce_mean
from hlbench.errors import ConfigError
from hlbench.models.heads import ConvBN, ConvBNReLU, DecodeHead, FCNHead, _projection, resize


def _bare_conv(cin, cout):
    """mmseg ConvModule without norm and activation: a biased 1×1 conv under the key `conv`."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, 1)))


class SelfAttentionBlock(nn.Module):
    """mmseg's SelfAttentionBlock: positions of the query map attend over the key map's positions, with attention
    weights softmax(q·k / √channels) over the values.

    Args:
        key_query_convs: ConvBNReLUs in the key and query projections.
        share_key_query: the query reuses the key projection (registered under both names, as mmseg's state dicts
            hold it).
        key_pool: a parameter-free module reducing the projected keys and values to fewer positions, or None.
        with_out: values projected to `channels`, then back to out_channels by `out_project`, a plain 1×1 conv that
            starts at zero (mmseg's init for a non-ConvModule out projection); else values go to out_channels.
    """

    def __init__(self, key_in_channels, query_in_channels, channels, out_channels, key_query_convs,
                 share_key_query=False, key_pool=None, with_out=True):
        super().__init__()
        self.channels = channels
        self.key_project = _projection(key_in_channels, channels, key_query_convs)
        self.query_project = (self.key_project if share_key_query
                              else _projection(query_in_channels, channels, key_query_convs))
        self.value_project = nn.Conv2d(key_in_channels, channels if with_out else out_channels, 1)
        self.out_project = None
        if with_out:
            self.out_project = nn.Conv2d(channels, out_channels, 1)
            nn.init.zeros_(self.out_project.weight)
            nn.init.zeros_(self.out_project.bias)
        self.key_pool = key_pool

    def forward(self, query_feats, key_feats):
        n, _, h, w = query_feats.shape
        query = self.query_project(query_feats).flatten(2).transpose(1, 2)  # N×Q×C
        key, value = self.key_project(key_feats), self.value_project(key_feats)
        if self.key_pool is not None:
            key, value = self.key_pool(key), self.key_pool(value)
        attention = (self.channels ** -0.5 * (query @ key.flatten(2))).softmax(dim=-1)  # N×Q×K
        context = (attention @ value.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(n, -1, h, w)
        return context if self.out_project is None else self.out_project(context)


class PyramidPoolConcat(nn.ModuleList):
    """ANN's key sampling (mmseg PPMConcat): the map average-pooled to each scale, all positions concatenated."""

    def __init__(self, pool_scales):
        super().__init__(nn.AdaptiveAvgPool2d(s) for s in pool_scales)

    def forward(self, x):
        return torch.cat([pool(x).flatten(2) for pool in self], dim=2)


class AFNB(nn.Module):
    """ANN's asymmetric fusion block: high-level queries attend over pooled low-level keys; the context is fused
    with the high-level map by a 1×1 ConvBN `bottleneck` (no activation, as mmseg)."""

    def __init__(self, low_in_channels, high_in_channels, channels, key_pool_scales):
        super().__init__()
        # mmseg keeps one block per query scale; ANN runs scale 1 only (its reshape fails at any other).
        self.stages = nn.ModuleList([SelfAttentionBlock(low_in_channels, high_in_channels, channels,
                                                        high_in_channels, 1,
                                                        key_pool=PyramidPoolConcat(key_pool_scales))])
        self.bottleneck = ConvBN(2 * high_in_channels, high_in_channels, 1)

    def forward(self, low_feats, high_feats):
        context = self.stages[0](high_feats, low_feats)
        return self.bottleneck(torch.cat([context, high_feats], dim=1))


class APNB(nn.Module):
    """ANN's asymmetric pyramid block: self-attention over pooled keys with the key projection shared by the
    queries, fused with its input by a 1×1 ConvBNReLU `bottleneck`."""

    def __init__(self, channels, project_channels, key_pool_scales):
        super().__init__()
        self.stages = nn.ModuleList([SelfAttentionBlock(channels, channels, project_channels, channels, 1,
                                                        share_key_query=True,
                                                        key_pool=PyramidPoolConcat(key_pool_scales))])
        self.bottleneck = ConvBNReLU(2 * channels, channels, 1)

    def forward(self, feats):
        return self.bottleneck(torch.cat([self.stages[0](feats, feats), feats], dim=1))


class ANNHead(DecodeHead):
    """ANN head: `fusion` (AFNB) of the stage-3 and stage-4 maps, dropout, 3×3 `bottleneck`, `context` (APNB).

    Args:
        in_channels: [low, high] widths of the two stages in in_index.
        project_channels: width of the keys, queries and values of both attention blocks.
        key_pool_scales: pyramid pooling scales giving the keys and values.
    """

    def __init__(self, in_channels, channels, num_classes, project_channels=256, key_pool_scales=(1, 3, 6, 8),
                 in_index=(2, 3), **kwargs):
        if len(in_channels) != 2 or len(in_index) != 2:
            raise ConfigError(f"ANNHead reads two stages (low, high), got in_index {in_index}")
        super().__init__(in_channels, channels, num_classes, in_index=list(in_index), **kwargs)
        low, high = in_channels
        self.fusion = AFNB(low, high, project_channels, key_pool_scales)
        self.bottleneck = ConvBNReLU(high, channels, 3)
        self.context = APNB(channels, project_channels, key_pool_scales)

    def forward(self, inputs):
        low, high = (inputs[i] for i in self.in_index)
        out = self.bottleneck(self.dropout(self.fusion(low, high)))  # mmseg drops out here and before conv_seg
        return self.classify(self.context(out))


class ISARelation(SelfAttentionBlock):
    """ISANet's self-attention within a group of positions (two-conv key/query projections, values kept at full
    width), then a 1×1 ConvBNReLU `output_project`."""

    def __init__(self, channels, isa_channels):
        super().__init__(channels, channels, isa_channels, channels, 2, with_out=False)
        self.output_project = ConvBNReLU(channels, channels, 1)

    def forward(self, x):
        return self.output_project(super().forward(x, x))


class ISAHead(DecodeHead):
    """ISANet head: 3×3 `in_conv`, long-range attention among positions with the same offset in every
    down_factor-sized cell (`global_relation`), short-range attention within each cell (`local_relation`), then
    `out_conv` over the result and the `in_conv` output. The map is zero-padded (centred) to a multiple of
    down_factor and cropped back."""

    def __init__(self, in_channels, channels, num_classes, isa_channels=256, down_factor=(8, 8), **kwargs):
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.down_factor = tuple(down_factor)
        self.in_conv = ConvBNReLU(in_channels, channels, 3)
        self.global_relation = ISARelation(channels, isa_channels)
        self.local_relation = ISARelation(channels, isa_channels)
        self.out_conv = ConvBNReLU(2 * channels, channels, 1)

    def forward(self, inputs):
        residual = x = self.in_conv(inputs[self.in_index])
        n, c, h, w = x.shape
        loc_h, loc_w = self.down_factor
        glb_h, glb_w = math.ceil(h / loc_h), math.ceil(w / loc_w)
        pad_h, pad_w = glb_h * loc_h - h, glb_w * loc_w - w
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        x = x.reshape(n, c, glb_h, loc_h, glb_w, loc_w)
        # Long range: one glb_h×glb_w map per offset (loc_h, loc_w) inside the cells.
        x = x.permute(0, 3, 5, 1, 2, 4).reshape(-1, c, glb_h, glb_w)
        x = self.global_relation(x).reshape(n, loc_h, loc_w, c, glb_h, glb_w)
        # Short range: one loc_h×loc_w map per cell.
        x = x.permute(0, 4, 5, 3, 1, 2).reshape(-1, c, loc_h, loc_w)
        x = self.local_relation(x).reshape(n, glb_h, glb_w, c, loc_h, loc_w)
        x = x.permute(0, 3, 1, 4, 2, 5).reshape(n, c, glb_h * loc_h, glb_w * loc_w)
        x = x[:, :, pad_h // 2:pad_h // 2 + h, pad_w // 2:pad_w // 2 + w]
        return self.classify(self.out_conv(torch.cat([x, residual], dim=1)))


class EMAModule(nn.Module):
    """EMANet's expectation-maximisation attention: num_stages EM iterations from the `bases` buffer (C×K,
    L2-normalised columns) re-express each position as a mix of K bases. No gradient passes through the
    iterations, as in mmseg. In training the batch's final bases, averaged over images and ranks, move `bases` by
    `momentum`."""

    def __init__(self, channels, num_bases, num_stages, momentum):
        super().__init__()
        if num_stages < 1:
            raise ConfigError(f"EMAHead num_stages must be >= 1, got {num_stages}")
        self.num_stages, self.momentum = num_stages, momentum
        bases = torch.randn(1, channels, num_bases) * math.sqrt(2.0 / num_bases)
        self.register_buffer("bases", F.normalize(bases, dim=1))

    def forward(self, feats):
        n, c, h, w = feats.shape
        feats = feats.reshape(n, c, h * w)
        bases = self.bases.expand(n, -1, -1)
        with torch.no_grad():
            for _ in range(self.num_stages):
                attention = torch.einsum("ncp,nck->npk", feats, bases).softmax(dim=2)  # E step
                weights = F.normalize(attention, p=1, dim=1)
                bases = F.normalize(torch.einsum("ncp,npk->nck", feats, weights), dim=1)  # M step
        recon = torch.einsum("nck,npk->ncp", bases, attention).reshape(n, c, h, w)
        if self.training:
            mean = all_reduce_mean({"bases": bases.mean(dim=0, keepdim=True)})["bases"]
            self.bases = (1 - self.momentum) * self.bases + self.momentum * F.normalize(mean, dim=1)
        return recon


class EMAHead(DecodeHead):
    """EMANet head: 3×3 `ema_in_conv` to ema_channels, a frozen biased 1×1 `ema_mid_conv`, `ema_module`, ReLU, 1×1
    ConvBN `ema_out_conv`, residual + ReLU, 3×3 `bottleneck` to channels, and with concat_input `conv_cat` over the
    head's input and that."""

    def __init__(self, in_channels, channels, num_classes, ema_channels=512, num_bases=64, num_stages=3,
                 momentum=0.1, concat_input=True, **kwargs):
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.ema_in_conv = ConvBNReLU(in_channels, ema_channels, 3)
        self.ema_mid_conv = _bare_conv(ema_channels, ema_channels)
        self.ema_mid_conv.requires_grad_(False)  # mmseg freezes it: the EM iterations carry no gradient anyway
        self.ema_module = EMAModule(ema_channels, num_bases, num_stages, momentum)
        self.ema_out_conv = ConvBN(ema_channels, ema_channels, 1)
        self.bottleneck = ConvBNReLU(ema_channels, channels, 3)
        self.concat_input = concat_input
        if concat_input:
            self.conv_cat = ConvBNReLU(in_channels + channels, channels, 3)

    def forward(self, inputs):
        x = inputs[self.in_index]
        identity = self.ema_in_conv(x)
        recon = self.ema_out_conv(F.relu(self.ema_module(self.ema_mid_conv(identity))))
        out = self.bottleneck(F.relu(identity + recon))
        if self.concat_input:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.classify(out)


class FCNContextHead(FCNHead):
    """An FCN head with two 3×3 convs and a context module between them (mmseg CCHead, NLHead, GCHead);
    concat_input (default true) adds `conv_cat` over the input and the second conv's output. Subclasses define
    `context(x)`."""

    def __init__(self, in_channels, channels, num_classes, **kwargs):
        super().__init__(in_channels, channels, num_classes, num_convs=2, **kwargs)

    def forward(self, inputs):
        x = inputs[self.in_index]
        out = self.convs[1](self.context(self.convs[0](x)))
        if self.concat_input:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.classify(out)


class Scale(nn.Module):
    """A learnable scalar factor (mmcv Scale: key `scale`)."""

    def __init__(self, value):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x):
        return x * self.scale


class CrissCrossAttention(nn.Module):
    """CCNet's attention (mmcv's pure-torch version): each position attends over its own column and row. The
    column term excludes the position itself (its score is -inf), so that the row term alone counts it. The result
    enters the input's residual through `gamma`, which starts at 0."""

    def __init__(self, channels):
        super().__init__()
        self.query_conv = nn.Conv2d(channels, channels // 8, 1)
        self.key_conv = nn.Conv2d(channels, channels // 8, 1)
        self.value_conv = nn.Conv2d(channels, channels, 1)
        self.gamma = Scale(0.0)

    def forward(self, x):
        query, key, value = self.query_conv(x), self.key_conv(x), self.value_conv(x)
        h = x.shape[2]
        column = torch.einsum("nchw,nciw->nhwi", query, key)
        self_in_column = torch.eye(h, dtype=torch.bool, device=x.device)[:, None, :]  # [h, ·, i]: i == h
        column = column.masked_fill(self_in_column, float("-inf"))
        row = torch.einsum("nchw,nchj->nhwj", query, key)
        attention = torch.cat([column, row], dim=-1).softmax(dim=-1)
        out = (torch.einsum("nciw,nhwi->nchw", value, attention[..., :h])
               + torch.einsum("nchj,nhwj->nchw", value, attention[..., h:]))
        return x + self.gamma(out)


class CCHead(FCNContextHead):
    """CCNet head: criss-cross attention `cca` applied `recurrence` times (shared weights) between the convs."""

    def __init__(self, in_channels, channels, num_classes, recurrence=2, **kwargs):
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.recurrence = recurrence
        self.cca = CrissCrossAttention(channels)

    def context(self, x):
        for _ in range(self.recurrence):
            x = self.cca(x)
        return x


class NonLocal2d(nn.Module):
    """Embedded-Gaussian non-local block (mmcv NonLocal2d): softmax(θ(x)ᵀφ(x) / √C') weights g(x) over all
    positions; `conv_out` (1×1 ConvBN) adds the result to x, its BN starting at zero so the block starts as the
    identity. θ, φ, g: biased 1×1 convs to C' = C / reduction, initialised N(0, 0.01)."""

    def __init__(self, channels, reduction=2, use_scale=True):
        super().__init__()
        self.inter_channels = max(channels // reduction, 1)
        self.use_scale = use_scale
        self.g, self.theta, self.phi = (_bare_conv(channels, self.inter_channels) for _ in range(3))
        for m in (self.g, self.theta, self.phi):
            nn.init.normal_(m.conv.weight, 0, 0.01)
            nn.init.zeros_(m.conv.bias)
        self.conv_out = ConvBN(self.inter_channels, channels, 1)
        nn.init.zeros_(self.conv_out.bn.weight)
        nn.init.zeros_(self.conv_out.bn.bias)

    def forward(self, x):
        n, _, h, w = x.shape
        g = self.g(x).flatten(2).transpose(1, 2)          # N×HW×C'
        theta = self.theta(x).flatten(2).transpose(1, 2)  # N×HW×C'
        weights = theta @ self.phi(x).flatten(2)          # N×HW×HW
        if self.use_scale:
            weights = weights / self.inter_channels ** 0.5
        y = (weights.softmax(dim=-1) @ g).transpose(1, 2).reshape(n, self.inter_channels, h, w)
        return x + self.conv_out(y)


class NLHead(FCNContextHead):
    """NonLocal head: a non-local block `nl_block` between the convs."""

    def __init__(self, in_channels, channels, num_classes, reduction=2, use_scale=True, **kwargs):
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.nl_block = NonLocal2d(channels, reduction, use_scale)

    def context(self, x):
        return self.nl_block(x)


class ContextBlock(nn.Module):
    """GCNet's global context block (mmcv ContextBlock): one context vector per image, pooled by a softmax over
    positions of a 1×1 `conv_mask` ('att') or by the mean ('avg'), transformed by 1×1 conv, LayerNorm, ReLU, 1×1
    conv, then added to (channel_add) and/or gating (channel_mul) every position. Each transform's last conv starts
    at zero, so the block starts as the identity."""

    POOLING, FUSIONS = ("att", "avg"), ("channel_add", "channel_mul")

    def __init__(self, channels, ratio, pooling_type="att", fusion_types=("channel_add",)):
        super().__init__()
        if pooling_type not in self.POOLING or not fusion_types or not set(fusion_types) <= set(self.FUSIONS):
            raise ConfigError(f"GCHead pooling_type must be one of {self.POOLING} and fusion_types a non-empty "
                              f"subset of {self.FUSIONS}, got {pooling_type!r}, {list(fusion_types)}")
        planes = int(channels * ratio)
        self.pooling_type = pooling_type
        if pooling_type == "att":
            self.conv_mask = nn.Conv2d(channels, 1, 1)
            nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(self.conv_mask.bias)
        self.channel_add_conv = self._transform(channels, planes) if "channel_add" in fusion_types else None
        self.channel_mul_conv = self._transform(channels, planes) if "channel_mul" in fusion_types else None

    @staticmethod
    def _transform(channels, planes):
        transform = nn.Sequential(nn.Conv2d(channels, planes, 1), nn.LayerNorm([planes, 1, 1]), nn.ReLU(inplace=True),
                                  nn.Conv2d(planes, channels, 1))
        nn.init.zeros_(transform[-1].weight)
        nn.init.zeros_(transform[-1].bias)
        return transform

    def forward(self, x):
        n, c = x.shape[:2]
        if self.pooling_type == "att":
            weights = self.conv_mask(x).reshape(n, 1, -1).softmax(dim=2)              # N×1×HW
            context = (x.reshape(n, c, -1) @ weights.transpose(1, 2)).reshape(n, c, 1, 1)
        else:
            context = x.mean(dim=(2, 3), keepdim=True)
        out = x
        if self.channel_mul_conv is not None:
            out = out * torch.sigmoid(self.channel_mul_conv(context))
        if self.channel_add_conv is not None:
            out = out + self.channel_add_conv(context)
        return out


class GCHead(FCNContextHead):
    """GCNet head: a global context block `gc_block` between the convs."""

    def __init__(self, in_channels, channels, num_classes, ratio=0.25, pooling_type="att",
                 fusion_types=("channel_add",), **kwargs):
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.gc_block = ContextBlock(channels, ratio, pooling_type, tuple(fusion_types))

    def context(self, x):
        return self.gc_block(x)


def psa_mask(x, mask_size, mode):
    """mmcv's PSAMask (the compiled psamask op) as an index gather.

    x holds, at each position q = (qh, qw), an mh×mw mask centred on q: N×(mh·mw)×H×W. "collect" returns
    out[n, p, q] = x[n, (ph − qh + (mh−1)//2)·mw + (pw − qw + (mw−1)//2), q] for each position p = (ph, pw) whose
    offset falls inside the mask, 0 elsewhere, as N×HW×H×W (p along channels). "distribute" is its transpose over
    (p, q): out[n, q, p].
    """
    n, _, h, w = x.shape
    mh, mw = mask_size
    ph = torch.arange(h, device=x.device).view(h, 1, 1, 1)
    pw = torch.arange(w, device=x.device).view(1, w, 1, 1)
    i = ph - ph.view(1, 1, h, 1) + (mh - 1) // 2  # mask row of p seen from q, as (ph, ·, qh, ·)
    j = pw - pw.view(1, 1, 1, w) + (mw - 1) // 2
    inside = ((i >= 0) & (i < mh) & (j >= 0) & (j < mw)).reshape(h * w, h * w)
    index = (i.clamp(0, mh - 1) * mw + j.clamp(0, mw - 1)).reshape(h * w, h * w)
    out = x.reshape(n, mh * mw, h * w).gather(1, index.expand(n, -1, -1)).masked_fill(~inside, 0)
    if mode == "distribute":
        out = out.transpose(1, 2)
    elif mode != "collect":
        raise ValueError(f"psa_mask mode must be 'collect' or 'distribute', got {mode!r}")
    return out.reshape(n, h * w, h, w)


class PSAHead(DecodeHead):
    """PSANet head, bi-directional: `reduce` / `reduce_p` (1×1) to channels, shrunk by shrink_factor; `attention`
    / `attention_p` predict an mh×mw mask per position, placed by psa_mask (collect / distribute) and softmaxed over
    positions, to aggregate the shrunk maps; both results go through `proj`, back to the input size, and the 3×3
    `bottleneck` over [input, that].

    mmseg's quirks are kept: `proj` is a 1×1 conv with padding 1 (its output is two pixels larger before the
    resize), and when both sides are odd the shrink keeps the corners ((h − 1) // s + 1, align_corners=True); that
    align_corners is also the final resize's.
    """

    def __init__(self, in_channels, channels, num_classes, mask_size=(97, 97), shrink_factor=2,
                 normalization_factor=1.0, psa_softmax=True, **kwargs):
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.mask_size, self.shrink_factor = tuple(mask_size), shrink_factor
        self.normalization_factor, self.psa_softmax = normalization_factor, psa_softmax
        mask_positions = self.mask_size[0] * self.mask_size[1]
        self.reduce = ConvBNReLU(in_channels, channels, 1)
        self.attention = nn.Sequential(ConvBNReLU(channels, channels, 1),
                                       nn.Conv2d(channels, mask_positions, 1, bias=False))
        self.reduce_p = ConvBNReLU(in_channels, channels, 1)
        self.attention_p = nn.Sequential(ConvBNReLU(channels, channels, 1),
                                         nn.Conv2d(channels, mask_positions, 1, bias=False))
        self.proj = ConvBNReLU(2 * channels, in_channels, 1, padding=1)
        self.bottleneck = ConvBNReLU(2 * in_channels, channels, 3)

    def _aggregate(self, x, mask_logits, mode):
        n, c, h, w = x.shape
        mask = psa_mask(mask_logits, self.mask_size, mode)
        if self.psa_softmax:
            mask = mask.softmax(dim=1)
        return (x.reshape(n, c, h * w) @ mask.reshape(n, h * w, h * w)).reshape(n, c, h, w) * (
            1.0 / self.normalization_factor)

    def forward(self, inputs):
        identity = inputs[self.in_index]
        x_col, x_dis = self.reduce(identity), self.reduce_p(identity)
        h, w = x_col.shape[2:]
        align_corners, s = self.align_corners, self.shrink_factor
        if s != 1:
            odd = h % s and w % s
            align_corners = bool(odd)
            size = ((h - 1) // s + 1, (w - 1) // s + 1) if odd else (h // s, w // s)
            x_col, x_dis = resize(x_col, size, align_corners), resize(x_dis, size, align_corners)
        out = torch.cat([self._aggregate(x_col, self.attention(x_col), "collect"),
                         self._aggregate(x_dis, self.attention_p(x_dis), "distribute")], dim=1)
        out = resize(self.proj(out), identity.shape[2:], align_corners)
        return self.classify(self.bottleneck(torch.cat([identity, out], dim=1)))
