"""Mask2Former (Cheng et al. 2022, "Masked-attention Mask Transformer for Universal Image Segmentation") as
mmseg 1.x runs it: mmseg's Mask2FormerHead, i.e. mmdet 3.x's head with a multi-scale deformable-attention pixel
decoder (MSDeformAttnPixelDecoder) and a masked-attention transformer decoder, under mmseg/mmdet's parameter
names so that mmseg's ADE20K Mask2Former checkpoints (decode_head.pixel_decoder..., decode_head.transformer_decoder...)
load as they are.

Everything is plain PyTorch: the deformable attention samples its values with grid_sample (the maths of the
Deformable DETR paper, Zhu et al. 2021, eq. 3, which mmcv's CUDA kernel also computes), so it runs on CPU.

The head returns one (class logits, mask logits) pair per decoder stage, the first from the queries before any
decoder layer, for deep supervision; the criterion is hlbench/methods/mask2former_criterion.py. Semantic
inference follows mmseg's Mask2FormerHead.predict: the last stage's mask logits upsampled to the input, then
sum over queries of softmax(class)[:-1] (no-object dropped) x sigmoid(mask).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hlbench.errors import ConfigError
from hlbench.models.segmentor import Segmentor
from hlbench.models.transformer_parts import map_to_tokens


def sine_position_encoding(batch, h, w, num_feats, device, temperature=10000.0, eps=1e-6):
    """(B, 2·num_feats, H, W) normalised sine encoding of DETR (Carion et al. 2020) for an unpadded map: the row
    and column index (1-based) scaled to (0, 2π], then sin/cos at num_feats/2 frequencies interleaved; rows first.
    As mmdet's SinePositionalEncoding(normalize=True) with an all-valid mask."""
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device)
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device)
    y = y / (y[-1] + eps) * (2 * math.pi)
    x = x / (x[-1] + eps) * (2 * math.pi)
    dim = torch.arange(num_feats, dtype=torch.float32, device=device)
    freq = temperature ** (2 * (dim // 2) / num_feats)

    def encode(pos):  # (n,) -> (n, num_feats): sin on even channels, cos on odd ones
        angles = pos[:, None] / freq
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(h, w, num_feats)
    pos_x = encode(x)[None, :, :].expand(h, w, num_feats)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)[None].expand(batch, -1, -1, -1)


def deformable_attention(value, shapes, locations, weights):
    """Multi-scale deformable attention's sampling and weighted sum.

    Args:
        value: (B, S, heads, d), the S = Σ h_l·w_l projected tokens of all levels, level after level.
        shapes: [(h_l, w_l)] per level.
        locations: (B, Q, heads, levels, points, 2) sampling positions as (x, y) in [0, 1] of each level's map.
        weights: (B, Q, heads, levels, points) attention weights (softmax over levels × points).
    Returns (B, Q, heads·d).
    """
    b, _, heads, d = value.shape
    q, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    grids = 2 * locations - 1  # grid_sample's [-1, 1], align_corners=False: pixel centres as the reference points
    sampled = []
    for level, (h, w) in enumerate(shapes):
        start = sum(hh * ww for hh, ww in shapes[:level])
        v = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(b * heads, d, h, w)
        g = grids[:, :, :, level].transpose(1, 2).reshape(b * heads, q, points, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    sampled = torch.stack(sampled, dim=3).flatten(3)  # (B·heads, d, Q, levels·points)
    w = weights.transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    return (sampled * w).sum(-1).view(b, heads * d, q).transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    """mmcv MultiScaleDeformableAttention (batch first) as a residual block: each query attends to `num_points`
    positions per head and level, offset from its reference point by `sampling_offsets` (in units of each level's
    cells), with weights from `attention_weights`; adds the input back (dropout 0 in every Mask2Former config)."""

    def __init__(self, dims=256, num_heads=8, num_levels=3, num_points=4):
        super().__init__()
        if dims % num_heads:
            raise ConfigError(f"model.head: deformable attention width {dims} must divide by its heads {num_heads}")
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dims, dims)
        self.output_proj = nn.Linear(dims, dims)
        self.init_weights()

    def init_weights(self):
        """Deformable DETR's init: zero offset weights, and biases that start head k's points on a ray at angle
        2πk/heads, point p at distance p + 1 cells; uniform attention; Xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        rays = torch.stack([angles.cos(), angles.sin()], -1)
        rays = rays / rays.abs().max(-1, keepdim=True)[0]
        grid = rays[:, None, None, :].repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, x, pos, reference_points, shapes):
        """x, pos: (B, S, C) tokens of all levels and their position + level encodings; reference_points (B, S,
        levels, 2) as (x, y) in [0, 1]; shapes [(h_l, w_l)]."""
        b, s, _ = x.shape
        query = x + pos
        value = self.value_proj(x).view(b, s, self.num_heads, -1)
        offsets = self.sampling_offsets(query).view(b, s, self.num_heads, self.num_levels, self.num_points, 2)
        weights = self.attention_weights(query).view(b, s, self.num_heads, self.num_levels * self.num_points)
        weights = weights.softmax(-1).view(b, s, self.num_heads, self.num_levels, self.num_points)
        # Offsets are in cells of each level: divide by that level's (w, h) to get [0, 1] units.
        cells = torch.tensor([[w, h] for h, w in shapes], dtype=x.dtype, device=x.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / cells[None, None, None, :, None, :]
        return x + self.output_proj(deformable_attention(value, shapes, locations, weights))


class FFN(nn.Module):
    """mmcv FFN with two fcs and ReLU: `layers.0.0` (Linear + ReLU), `layers.1` (Linear), plus the identity."""

    def __init__(self, dims, hidden):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dims, hidden), nn.ReLU(inplace=True)),
                                    nn.Linear(hidden, dims))

    def forward(self, x):
        return x + self.layers(x)


class ConvGN(nn.Module):
    """mmcv ConvModule with GroupNorm: keys `conv.*`, `gn.*`; ReLU after the norm if `relu`."""

    def __init__(self, cin, cout, kernel_size, bias, relu, groups=32):
        super().__init__()
        if cout % groups:
            raise ConfigError(f"model.head: GroupNorm({groups}) needs feat_channels divisible by {groups}, got {cout}")
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=bias)
        self.gn = nn.GroupNorm(groups, cout)
        self.relu = relu

    def forward(self, x):
        x = self.gn(self.conv(x))
        return F.relu(x) if self.relu else x


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, LayerNorm `norms.0`, FFN, LayerNorm `norms.1`."""

    def __init__(self, dims, num_heads, num_levels, num_points, ffn_dims):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(dims, num_heads, num_levels, num_points)
        self.ffn = FFN(dims, ffn_dims)
        self.norms = nn.ModuleList([nn.LayerNorm(dims), nn.LayerNorm(dims)])

    def forward(self, x, pos, reference_points, shapes):
        x = self.norms[0](self.self_attn(x, pos, reference_points, shapes))
        return self.norms[1](self.ffn(x))


class DeformableEncoder(nn.Module):
    def __init__(self, num_layers, **layer_args):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_args) for _ in range(num_layers))

    def forward(self, x, pos, reference_points, shapes):
        for layer in self.layers:
            x = layer(x, pos, reference_points, shapes)
        return x


class MSDeformAttnPixelDecoder(nn.Module):
    """mmdet MSDeformAttnPixelDecoder: the `num_levels` coarsest backbone stages, each projected to feat_channels
    (`input_convs`, 1×1 conv + GN, coarsest first), go through the deformable encoder together; the finer stages
    join FPN-style (`lateral_convs` 1×1 + GN, nearest coarser output upsampled bilinearly and added, `output_convs`
    3×3 + GN + ReLU). Returns the 1×1 `mask_feature` projection of the finest map and the encoder's outputs
    (coarsest first), which the transformer decoder attends to in turn.

    Args:
        strides: of the backbone stages; only their ratios matter (reference points are cell centres in [0, 1]).
    """

    def __init__(self, in_channels, feat_channels=256, out_channels=256, num_levels=3, num_layers=6, num_heads=8,
                 num_points=4, ffn_dims=1024):
        super().__init__()
        if not 1 <= num_levels <= len(in_channels):
            raise ConfigError(f"model.head.num_levels must be between 1 and the {len(in_channels)} backbone stages, "
                              f"got {num_levels}")
        self.num_levels = num_levels
        coarse = list(reversed(in_channels))[:num_levels]
        fine = list(in_channels[:len(in_channels) - num_levels])
        self.input_convs = nn.ModuleList(ConvGN(c, feat_channels, 1, bias=True, relu=False) for c in coarse)
        self.encoder = DeformableEncoder(num_layers, dims=feat_channels, num_heads=num_heads, num_levels=num_levels,
                                         num_points=num_points, ffn_dims=ffn_dims)
        self.level_encoding = nn.Embedding(num_levels, feat_channels)
        # mmdet builds these from the finest remaining stage upwards but indexes them by stage: entry i is stage i.
        self.lateral_convs = nn.ModuleList(ConvGN(c, feat_channels, 1, bias=False, relu=False) for c in fine)
        self.output_convs = nn.ModuleList(ConvGN(feat_channels, feat_channels, 3, bias=False, relu=True)
                                          for _ in fine)
        self.mask_feature = nn.Conv2d(feat_channels, out_channels, 1)
        self.init_weights()

    def init_weights(self):
        """mmdet's: Xavier-uniform input projections, Caffe2-Xavier (Kaiming-uniform, a=1) FPN convs and mask
        projection, N(0, 1) level encoding, Xavier-normal encoder matrices, then Deformable DETR's attention init."""
        for conv in self.input_convs:
            nn.init.xavier_uniform_(conv.conv.weight)
            nn.init.zeros_(conv.conv.bias)
        for conv in [c.conv for c in (*self.lateral_convs, *self.output_convs)] + [self.mask_feature]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        nn.init.normal_(self.level_encoding.weight)
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        for layer in self.encoder.layers:
            layer.self_attn.init_weights()

    def forward(self, feats):
        b = feats[0].shape[0]
        coarse = list(reversed(feats))[:self.num_levels]
        tokens, pos, refs, shapes = [], [], [], []
        for i, (feat, conv) in enumerate(zip(coarse, self.input_convs)):
            h, w = feat.shape[2:]
            tokens.append(map_to_tokens(conv(feat)))
            level_pos = sine_position_encoding(b, h, w, conv.conv.out_channels // 2, feat.device)
            pos.append(map_to_tokens(level_pos + self.level_encoding.weight[i].view(1, -1, 1, 1)))
            ys, xs = torch.meshgrid((torch.arange(h, device=feat.device, dtype=torch.float32) + 0.5) / h,
                                    (torch.arange(w, device=feat.device, dtype=torch.float32) + 0.5) / w,
                                    indexing="ij")
            refs.append(torch.stack([xs.flatten(), ys.flatten()], -1))
            shapes.append((h, w))
        # Every query keeps its (x, y) on all levels: no padding, so the valid ratios are 1.
        reference_points = torch.cat(refs)[None, :, None].expand(b, -1, self.num_levels, -1).to(feats[0].dtype)
        memory = self.encoder(torch.cat(tokens, 1), torch.cat(pos, 1), reference_points, shapes)
        outs = [m.transpose(1, 2).reshape(b, -1, h, w)
                for m, (h, w) in zip(memory.split([h * w for h, w in shapes], 1), shapes)]
        for i in reversed(range(len(self.lateral_convs))):
            lateral = self.lateral_convs[i](feats[i])
            up = F.interpolate(outs[-1], size=lateral.shape[2:], mode="bilinear", align_corners=False)
            outs.append(self.output_convs[i](lateral + up))
        return self.mask_feature(outs[-1]), outs[:self.num_levels]


class AttentionBlock(nn.Module):
    """mmcv MultiheadAttention: nn.MultiheadAttention `attn` on (query + query_pos, key + key_pos, value), plus
    the query back as identity."""

    def __init__(self, dims, num_heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(dims, num_heads, batch_first=True)

    def forward(self, query, key, value, query_pos, key_pos, attn_mask=None):
        out = self.attn(query + query_pos, key + key_pos, value, attn_mask=attn_mask, need_weights=False)[0]
        return query + out


class MaskedDecoderLayer(nn.Module):
    """mmdet Mask2FormerTransformerDecoderLayer: masked cross-attention to one pixel-decoder level, LayerNorm
    `norms.0`, self-attention among the queries, `norms.1`, FFN, `norms.2` (the paper's order: cross first)."""

    def __init__(self, dims, num_heads, ffn_dims):
        super().__init__()
        self.cross_attn = AttentionBlock(dims, num_heads)
        self.self_attn = AttentionBlock(dims, num_heads)
        self.ffn = FFN(dims, ffn_dims)
        self.norms = nn.ModuleList(nn.LayerNorm(dims) for _ in range(3))

    def forward(self, query, query_pos, memory, memory_pos, attn_mask):
        query = self.norms[0](self.cross_attn(query, memory, memory, query_pos, memory_pos, attn_mask))
        query = self.norms[1](self.self_attn(query, query, query, query_pos, query_pos))
        return self.norms[2](self.ffn(query))


class MaskedTransformerDecoder(nn.Module):
    """`layers` plus the LayerNorm `post_norm` that every prediction reads the queries through."""

    def __init__(self, num_layers, dims, num_heads, ffn_dims):
        super().__init__()
        self.layers = nn.ModuleList(MaskedDecoderLayer(dims, num_heads, ffn_dims) for _ in range(num_layers))
        self.post_norm = nn.LayerNorm(dims)


class Mask2FormerHead(nn.Module):
    """mmseg 1.x Mask2FormerHead (mmdet's with one class per semantic category plus no-object).

    The authors' ADE20K runs (mmseg's mask2former_swin-*_8xb2-160k configs): feat_channels 256, 100 queries,
    3 levels, a 6-layer deformable encoder (8 heads, 4 points, FFN 1024), a 9-layer decoder (8 heads, FFN 2048).
    The decoder's width is feat_channels, so its input projections are identities (mmdet's
    enforce_decoder_input_project=False) and hold no parameters.

    Args:
        in_channels: widths of the backbone stages it reads (in_index, all four in mmseg's configs).
        num_levels: pixel-decoder levels the encoder and the decoder's masked attention use (coarsest first).
        encoder_*: the pixel decoder's deformable encoder; decoder_*: the masked-attention decoder.
    """

    def __init__(self, in_channels, num_classes, align_corners=False, in_index=(0, 1, 2, 3), feat_channels=256,
                 out_channels=256, num_queries=100, num_levels=3, encoder_layers=6, encoder_heads=8,
                 encoder_points=4, encoder_ffn=1024, decoder_layers=9, decoder_heads=8, decoder_ffn=2048):
        super().__init__()
        if feat_channels % decoder_heads:
            raise ConfigError(f"model.head.feat_channels {feat_channels} must divide by decoder_heads {decoder_heads}")
        self.in_channels, self.num_classes, self.align_corners = in_channels, num_classes, align_corners
        self.in_index, self.num_queries, self.num_levels = list(in_index), num_queries, num_levels
        self.num_heads = decoder_heads
        self.pixel_decoder = MSDeformAttnPixelDecoder(in_channels, feat_channels, out_channels, num_levels,
                                                      encoder_layers, encoder_heads, encoder_points, encoder_ffn)
        self.transformer_decoder = MaskedTransformerDecoder(decoder_layers, feat_channels, decoder_heads, decoder_ffn)
        self.query_embed = nn.Embedding(num_queries, feat_channels)  # positional part of each query
        self.query_feat = nn.Embedding(num_queries, feat_channels)   # its learnt initial content
        self.level_embed = nn.Embedding(num_levels, feat_channels)
        self.cls_embed = nn.Linear(feat_channels, num_classes + 1)   # the last class is "no object"
        self.mask_embed = nn.Sequential(nn.Linear(feat_channels, feat_channels), nn.ReLU(inplace=True),
                                        nn.Linear(feat_channels, feat_channels), nn.ReLU(inplace=True),
                                        nn.Linear(feat_channels, out_channels))
        # mmdet's init: Xavier-normal decoder matrices; the embeddings and the prediction layers keep PyTorch's
        # defaults (N(0, 1) embeddings), as mmdet leaves them.
        for p in self.transformer_decoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)

    def _predict(self, query, mask_features, attn_size):
        """Class and mask logits of the current queries, and the next layer's attention mask: True (blocked)
        where the mask, resized to the next level, has probability < 0.5; a query that would block everything
        attends everywhere instead (the paper's §3.2 masked attention)."""
        query = self.transformer_decoder.post_norm(query)
        cls = self.cls_embed(query)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(query), mask_features)
        blocked = F.interpolate(masks, size=attn_size, mode="bilinear", align_corners=False).sigmoid() < 0.5
        blocked = blocked.flatten(2).detach()
        blocked = blocked & ~blocked.all(-1, keepdim=True)
        # nn.MultiheadAttention takes a (B·heads, Q, K) mask, image-major.
        return cls, masks, blocked.repeat_interleave(self.num_heads, dim=0)

    def forward(self, feats):
        """Per stage (the initial queries, then each decoder layer): class logits (B, Q, classes + 1) and mask
        logits (B, Q, H/4, W/4); returns the two lists."""
        feats = [feats[i] for i in self.in_index]
        b = feats[0].shape[0]
        mask_features, levels = self.pixel_decoder(feats)
        memory, memory_pos = [], []
        for i, level in enumerate(levels):
            memory.append(map_to_tokens(level) + self.level_embed.weight[i].view(1, 1, -1))
            memory_pos.append(map_to_tokens(sine_position_encoding(b, *level.shape[2:], level.shape[1] // 2,
                                                                   level.device)).to(level.dtype))
        query = self.query_feat.weight[None].expand(b, -1, -1)
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        cls, masks, blocked = self._predict(query, mask_features, levels[0].shape[2:])
        all_cls, all_masks = [cls], [masks]
        for i, layer in enumerate(self.transformer_decoder.layers):
            level = i % self.num_levels
            query = layer(query, query_pos, memory[level], memory_pos[level], blocked)
            cls, masks, blocked = self._predict(query, mask_features, levels[(i + 1) % self.num_levels].shape[2:])
            all_cls.append(cls)
            all_masks.append(masks)
        return all_cls, all_masks


def semantic_scores(cls_logits, mask_logits, size):
    """mmseg's semantic inference: mask logits resized (bilinear) to `size`, then Σ_q softmax(class)[:-1] ·
    sigmoid(mask): (B, classes, H, W) scores in [0, Q], argmax = the prediction."""
    masks = F.interpolate(mask_logits, size=tuple(size), mode="bilinear", align_corners=False).sigmoid()
    return torch.einsum("bqc,bqhw->bchw", cls_logits.softmax(-1)[..., :-1], masks)


class Mask2FormerSegmentor(Segmentor):
    """Backbone + Mask2FormerHead. Training outputs {"cls", "masks"}: the per-stage lists for the criterion;
    eval outputs and predict give the semantic scores (semantic_scores), which play the logits' part (argmax,
    window averaging). It has no HL head: the HL map enters Mask2Former fixed, through the criterion."""

    def __init__(self, backbone, decode_head, auxiliary_head=None, hl_head=None, align_corners=False,
                 detach_hl_features=True):
        if auxiliary_head is not None or hl_head is not None:
            raise ConfigError("Mask2Former takes no auxiliary or HL head (model.aux off; its HL map is fixed and "
                              "enters through the criterion)")
        super().__init__(backbone, decode_head, None, None, align_corners, detach_hl_features)

    def forward(self, img, feature_perturbation=False):
        if feature_perturbation:
            raise ConfigError("Mask2Former has no feature perturbation")
        cls, masks = self.decode_head(self.backbone(img))
        if self.training:
            return {"cls": cls, "masks": masks}
        return {"out": semantic_scores(cls[-1], masks[-1], masks[-1].shape[2:])}

    def _decode(self, img):
        """As mmseg: the mask logits are upsampled to the (padded) input before the sigmoid and the sum."""
        cls, masks = self.decode_head(self.backbone(img))
        return semantic_scores(cls[-1], masks[-1], img.shape[2:])
