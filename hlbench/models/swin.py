"""Swin Transformer (Liu et al. 2021) as mmseg 1.x builds it, under mmseg's state-dict keys so that mmseg's
converted ImageNet files (swin_*_2022*.pth) load as is.

Two details differ from timm's Swin and change the logits at sizes that are not window multiples (every stage of
a 512 or 640 crop with window 12): mmseg pads each stage's tokens to a multiple of the window *before* the cyclic
shift (as the official Swin-Segmentation code) and builds the shift mask on the padded grid; and its PatchMerging
gathers the 2×2 neighbourhood channel-major (nn.Unfold order), which mmseg's converter reorders the official
weights for.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from hlbench.errors import ConfigError
from hlbench.models.transformer_parts import (DropPath, check_stage_lists, drop_path_rates, init_linears,
                                              map_to_tokens, tokens_to_map)

# The official Swin's additive mask between tokens of different regions of a shifted window.
MASKED = -100.0


def _pad_to_multiple(x, multiple):
    """Zero-pad a (B, C, H, W) map at the bottom and right to sides divisible by `multiple` (mmseg's "corner"
    padding)."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % multiple, 0, -h % multiple))


def relative_position_index(window):
    """(window², window²) index into the bias table: (Δrow + window - 1) · (2·window - 1) + Δcol + window - 1 for
    every pair of positions in a window."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    delta_row = rows[:, None] - rows[None, :] + window - 1
    delta_col = cols[:, None] - cols[None, :] + window - 1
    return delta_row * (2 * window - 1) + delta_col


def _windows(x, window):
    """(B, H, W, C) with H, W window multiples -> (B · windows, window², C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c)


def _merge_windows(x, window, b, h, w):
    """Inverse of _windows: (B · windows, window², C) -> (B, H, W, C)."""
    x = x.reshape(b, h // window, w // window, window, window, -1).transpose(2, 3)
    return x.reshape(b, h, w, -1)


def shift_mask(h, w, window, shift, device):
    """(windows, window², window²) additive mask of a shifted window pass on an H×W (padded) grid: after the cyclic
    shift, windows on the last row/column hold tokens of up to three regions that were not neighbours, and tokens
    only attend within their own region."""
    def bands(n):
        band = torch.zeros(n, device=device)
        band[n - window:] = 1
        band[n - shift:] = 2
        return band
    region = (bands(h)[:, None] * 3 + bands(w)[None, :])[None, :, :, None]
    region = _windows(region, window).squeeze(-1)
    return (region[:, :, None] != region[:, None, :]).float() * MASKED


class WindowMSA(nn.Module):
    """Multi-head self-attention within a window, with a learnt bias per relative position and head
    (`relative_position_bias_table`, indexed by the `relative_position_index` buffer, which mmseg saves)."""

    def __init__(self, dim, num_heads, window):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(length, length, -1).permute(2, 0, 1)
        if mask is not None:  # the same mask for each image's windows
            attn = (attn.view(-1, mask.shape[0], self.num_heads, length, length) + mask[:, None]).flatten(0, 1)
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, length, dim)
        return self.proj(out)


class ShiftWindowMSA(nn.Module):
    """Window attention over a (B, H·W, C) token grid: padded to window multiples, cyclically shifted by
    `shift` (shifted blocks), attended per window (`w_msa`), shifted back and cropped."""

    def __init__(self, dim, num_heads, window, shift, drop_prob):
        super().__init__()
        self.window, self.shift = window, shift
        self.w_msa = WindowMSA(dim, num_heads, window)
        self.drop = DropPath(drop_prob)

    def forward(self, x, hw):
        (h, w), b = hw, x.shape[0]
        grid = _pad_to_multiple(tokens_to_map(x, hw), self.window).permute(0, 2, 3, 1)
        hp, wp = grid.shape[1:3]
        mask = None
        if self.shift:
            grid = torch.roll(grid, (-self.shift, -self.shift), dims=(1, 2))
            mask = shift_mask(hp, wp, self.window, self.shift, x.device).to(x.dtype)
        grid = _merge_windows(self.w_msa(_windows(grid, self.window), mask), self.window, b, hp, wp)
        if self.shift:
            grid = torch.roll(grid, (self.shift, self.shift), dims=(1, 2))
        return self.drop(grid[:, :h, :w].reshape(b, h * w, -1))


class FFN(nn.Module):
    """mmcv FFN with two fcs: `layers.0.0` (Linear + GELU) and `layers.1` (Linear), stochastic depth on the
    output."""

    def __init__(self, dim, hidden, drop_prob):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.GELU()), nn.Linear(hidden, dim))
        self.dropout_layer = DropPath(drop_prob)

    def forward(self, x):
        return self.dropout_layer(self.layers(x))


class SwinBlock(nn.Module):
    """Pre-norm residual block: shifted-window attention, then the MLP."""

    def __init__(self, dim, num_heads, window, shift, mlp_ratio, drop_prob):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ShiftWindowMSA(dim, num_heads, window, shift, drop_prob)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FFN(dim, int(mlp_ratio * dim), drop_prob)

    def forward(self, x, hw):
        x = x + self.attn(self.norm1(x), hw)
        return x + self.ffn(self.norm2(x))


class PatchMerging(nn.Module):
    """2×2 neighbourhoods (the grid padded to even sides) concatenated channel-major as nn.Unfold orders them,
    LayerNorm over the 4·C values, bias-free linear `reduction` to 2·C."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x, hw):
        grid = _pad_to_multiple(tokens_to_map(x, hw), 2)
        out_hw = (grid.shape[2] // 2, grid.shape[3] // 2)
        return self.reduction(self.norm(F.unfold(grid, 2, stride=2).transpose(1, 2))), out_hw


class SwinStage(nn.Module):
    """mmseg SwinBlockSequence: `blocks`, every second one shifted by half a window, then the `downsample`
    (PatchMerging) of all but the last stage. Returns the merged tokens and the stage's own output."""

    def __init__(self, dim, depth, num_heads, window, mlp_ratio, drop_probs, downsample):
        super().__init__()
        self.blocks = nn.ModuleList(SwinBlock(dim, num_heads, window, window // 2 if i % 2 else 0, mlp_ratio, p)
                                    for i, p in zip(range(depth), drop_probs))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x, hw):
        for block in self.blocks:
            x = block(x, hw)
        if self.downsample is None:
            return x, hw, x
        merged, merged_hw = self.downsample(x, hw)
        return merged, merged_hw, x


class PatchEmbed(nn.Module):
    """Non-overlapping patches: the image padded at the bottom/right to a patch multiple, a patch-sized stride-patch
    `projection` conv, LayerNorm over the tokens."""

    def __init__(self, dim, patch_size):
        super().__init__()
        self.patch_size = patch_size
        self.projection = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.projection(_pad_to_multiple(x, self.patch_size))
        return self.norm(map_to_tokens(x)), tuple(x.shape[2:])


class SwinTransformer(nn.Module):
    """mmseg SwinTransformer without absolute position embedding (off in every Swin segmentation config, so its
    `pretrain_img_size` plays no part): `patch_embed`, four `stages` and a LayerNorm `norm{i}` on each output,
    which the ImageNet file lacks (they start at (1, 0)).

    Args:
        embed_dims: width of stage 0; each PatchMerging doubles it (Swin-B: 128).
        depths, num_heads: blocks and attention heads per stage (Swin-B: 2, 2, 18, 2 and 4, 8, 16, 32).
        window_size: side of the attention windows; shifted blocks move them by window_size // 2.
        drop_path_rate: stochastic depth of the last block, rising linearly from 0 over all blocks.
    """

    def __init__(self, embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12,
                 mlp_ratio=4, patch_size=4, drop_path_rate=0.3):
        super().__init__()
        check_stage_lists("swin", len(depths), num_heads=num_heads)
        if window_size < 2:
            raise ConfigError(f"model.backbone.window_size must be >= 2 (shifted windows move by half of it), got "
                              f"{window_size}")
        widths = [embed_dims * 2 ** i for i in range(len(depths))]
        bad = [(c, n) for c, n in zip(widths, num_heads) if c % n]
        if bad:
            raise ConfigError(f"model.backbone: each stage's width must divide by its num_heads; (width, heads) "
                              f"{bad} do not")
        self.patch_embed = PatchEmbed(embed_dims, patch_size)
        self.stages = nn.ModuleList(
            SwinStage(c, d, n, window_size, mlp_ratio, p, downsample=i < len(depths) - 1)
            for i, (c, d, n, p) in enumerate(zip(widths, depths, num_heads, drop_path_rates(drop_path_rate, depths))))
        for i, c in enumerate(widths):
            self.add_module(f"norm{i}", nn.LayerNorm(c))
        self.out_channels = widths
        init_linears(self)

    def forward(self, x):
        x, hw = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x, next_hw, out = stage(x, hw)
            outs.append(tokens_to_map(getattr(self, f"norm{i}")(out), hw))
            hw = next_hw
        return outs
