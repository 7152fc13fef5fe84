"""Mix Transformer, SegFormer's encoder (Xie et al. 2021), as mmseg 1.x builds it (MixVisionTransformer), under
mmseg's state-dict keys so that its converted mit_b*_20220624.pth files load as is.

As the official NVlabs code and mmseg, every LayerNorm has eps 1e-6 (HF transformers' SegFormer uses 1e-5), and
the query and key/value projections are one packed nn.MultiheadAttention `in_proj` as mmseg's converter stores
them.
"""
from collections import OrderedDict

import torch.nn as nn

from hlbench.models.transformer_parts import (DropPath, check_stage_lists, drop_path_rates, init_linears,
                                              map_to_tokens, tokens_to_map)

LN_EPS = 1e-6


class OverlapPatchEmbed(nn.Module):
    """Overlapping patches: a `projection` conv (kernel k, padding k // 2) then LayerNorm over the tokens."""

    def __init__(self, cin, dim, patch_size, stride):
        super().__init__()
        self.projection = nn.Conv2d(cin, dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x):
        x = self.projection(x)
        return self.norm(map_to_tokens(x)), tuple(x.shape[2:])


class EfficientMultiheadAttention(nn.Module):
    """Self-attention whose keys and values come from the tokens reduced by a stride-`sr_ratio` conv `sr` and a
    LayerNorm `norm` (none at ratio 1), with stochastic depth on the output."""

    def __init__(self, dim, num_heads, sr_ratio, drop_prob):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.dropout_layer = DropPath(drop_prob)

    def forward(self, x, hw):
        kv = self.norm(map_to_tokens(self.sr(tokens_to_map(x, hw)))) if self.sr_ratio > 1 else x
        return self.dropout_layer(self.attn(x, kv, kv, need_weights=False)[0])


class MixFFN(nn.Module):
    """1×1 conv, 3×3 depthwise conv (SegFormer's positional information), GELU, 1×1 conv on the token map; stochastic
    depth on the output. The `layers` indices are mmseg's, whose Sequential also holds two dropouts (rate 0 in
    every SegFormer config) at 3 and 5."""

    def __init__(self, dim, hidden, drop_prob):
        super().__init__()
        self.layers = nn.Sequential(OrderedDict([
            ("0", nn.Conv2d(dim, hidden, 1)), ("1", nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)),
            ("2", nn.GELU()), ("4", nn.Conv2d(hidden, dim, 1))]))
        self.dropout_layer = DropPath(drop_prob)

    def forward(self, x, hw):
        return self.dropout_layer(map_to_tokens(self.layers(tokens_to_map(x, hw))))


class TransformerEncoderLayer(nn.Module):
    """Pre-norm residual block: efficient attention, then the Mix-FFN."""

    def __init__(self, dim, num_heads, mlp_ratio, sr_ratio, drop_prob):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = EfficientMultiheadAttention(dim, num_heads, sr_ratio, drop_prob)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.ffn = MixFFN(dim, mlp_ratio * dim, drop_prob)

    def forward(self, x, hw):
        x = x + self.attn(self.norm1(x), hw)
        return x + self.ffn(self.norm2(x), hw)


class MixVisionTransformer(nn.Module):
    """mmseg MixVisionTransformer: `layers.i` = [OverlapPatchEmbed, blocks, LayerNorm] per stage; each stage's
    output map is returned.

    Args:
        embed_dims: stage i has embed_dims · num_heads[i] channels (B0: 32 -> 32, 64, 160, 256; B3/B5: 64).
        num_layers, num_heads: blocks and attention heads per stage (B0: 2, 2, 2, 2; B3: 3, 4, 18, 3;
            B5: 3, 6, 40, 3; heads 1, 2, 5, 8).
        patch_sizes, strides: of each stage's overlapping patch embedding (7, 3, 3, 3 and 4, 2, 2, 2).
        sr_ratios: key/value spatial reduction per stage (8, 4, 2, 1).
        drop_path_rate: stochastic depth of the last block, rising linearly from 0 over all blocks.
    """

    def __init__(self, embed_dims=64, num_layers=(3, 4, 6, 3), num_heads=(1, 2, 5, 8), patch_sizes=(7, 3, 3, 3),
                 strides=(4, 2, 2, 2), sr_ratios=(8, 4, 2, 1), mlp_ratio=4, drop_path_rate=0.1):
        super().__init__()
        check_stage_lists("mit", len(num_layers), num_heads=num_heads, patch_sizes=patch_sizes, strides=strides,
                          sr_ratios=sr_ratios)
        widths = [embed_dims * n for n in num_heads]
        self.layers = nn.ModuleList()
        for i, (c, heads, probs) in enumerate(zip(widths, num_heads, drop_path_rates(drop_path_rate, num_layers))):
            blocks = nn.ModuleList(TransformerEncoderLayer(c, heads, mlp_ratio, sr_ratios[i], p) for p in probs)
            embed = OverlapPatchEmbed(widths[i - 1] if i else 3, c, patch_sizes[i], strides[i])
            self.layers.append(nn.ModuleList([embed, blocks, nn.LayerNorm(c, eps=LN_EPS)]))
        self.out_channels = widths
        init_linears(self)
        # mmseg's from-scratch init of the convs: normal with std sqrt(2 / fan_out), zero bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, (2 / fan_out) ** 0.5)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        outs = []
        for embed, blocks, norm in self.layers:
            x, hw = embed(x)
            for block in blocks:
                x = block(x, hw)
            x = tokens_to_map(norm(x), hw)
            outs.append(x)
        return outs
