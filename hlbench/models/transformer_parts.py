"""Pieces the ConvNeXt, Swin and MiT backbones share: stochastic depth, its per-block rates, token <-> map reshapes
and the truncated-normal init of their linear layers."""

import torch
import torch.nn as nn

from hlbench.errors import ConfigError


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): in training, each sample's residual branch is dropped with probability
    `drop_prob` and the kept ones are scaled by 1 / (1 - drop_prob); the identity in eval mode.

    One uniform draw per sample from the global generator, as mmcv's DropPath does, so a seeded run drops the same
    paths every time, and mmseg given the same seed drops the same ones (analysis/mmseg_parity.py relies on it).
    """

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0:
            return x
        draw = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        return x * (draw >= self.drop_prob).to(x.dtype) / (1 - self.drop_prob)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob:.3f}"


def drop_path_rates(rate: float, depths) -> list[list[float]]:
    """Per stage, the drop-path probability of each block: rising linearly from 0 at the first block to `rate` at
    the last block of the whole network (the ConvNeXt, Swin and SegFormer papers' rule)."""
    if not 0 <= rate < 1:
        raise ConfigError(f"model.backbone.drop_path_rate must be in [0, 1), got {rate}")
    total = sum(depths)
    # Python arithmetic rather than torch.linspace: models are also built on the meta device to count FLOPs.
    flat = [rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return [flat[s:s + d] for s, d in zip(starts, depths)]


def check_stage_lists(backbone: str, num_stages: int, **lists):
    """ConfigError naming each per-stage list whose length is not num_stages."""
    for key, values in lists.items():
        if len(values) != num_stages:
            raise ConfigError(f"model.backbone.{key} of {backbone} needs one entry per stage ({num_stages}), got "
                              f"{list(values)}")


def tokens_to_map(x, hw):
    """(B, H·W, C) tokens to a (B, C, H, W) map."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw)


def map_to_tokens(x):
    """(B, C, H, W) map to (B, H·W, C) tokens."""
    return x.flatten(2).transpose(1, 2)


def init_linears(module: nn.Module):
    """Truncated normal (std 0.02, bias 0) for every nn.Linear: the from-scratch init of mmseg's Swin and MiT and of
    mmpretrain's ConvNeXt; LayerNorms keep PyTorch's (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
