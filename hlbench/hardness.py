"""Hardness-level (HL) learning: the weighted segmentation loss and the HL branch's adversarial loss.

Reference: the authors' code (Menoly-xin/Hardness-Level-Learning, `mmseg/models/segmentors/hl_encoder_decoder.py`).

    h = sigmoid(D) + c              D: raw HL-branch logits, resized to the label size first
    H = h / S,  S = sum of h over the normalisation scope
    L_s = sum_i sg(H_i) * l_i       trains backbone + decode head
    L_h = -lam * sum_i H_i * sg(l_i)   trains the HL branch only

With a uniform H, L_s is the mean per-pixel loss, which is why the reference (and `scope="batch"`) keeps
ignored pixels (l = 0) in S: the mmseg 0.x baseline averages its CE over all pixels too.
"""
from __future__ import annotations

import torch

from hlbench.errors import ConfigError

SCOPES = ("batch", "image", "group")
IMAGE_REDUCTIONS = ("mean", "sum")


def hardness_weights(hl_logits: torch.Tensor, *, offset: float = 0.1, scope: str = "batch",
                     valid_mask: torch.Tensor | None = None, group_size: int = 2) -> torch.Tensor:
    """H = (sigmoid(D) + offset) normalised to sum 1 over the scope; (N, H, W), float32.

    `scope="group"` normalises within consecutive groups of `group_size` images, the exact single-GPU
    emulation of the reference's per-GPU normaliser (4 GPUs x 2 images -> group_size=2).
    """
    if scope not in SCOPES:
        raise ConfigError(f"hl scope must be one of {SCOPES}, got {scope!r}")
    if hl_logits.dim() == 4:
        if hl_logits.shape[1] != 1:
            raise ValueError(f"hl_logits must have one channel, got shape {tuple(hl_logits.shape)}")
        hl_logits = hl_logits[:, 0]
    # The normaliser sums millions of pixels: keep it in fp32 even under bf16 autocast.
    h = torch.sigmoid(hl_logits.float()) + offset
    if valid_mask is not None:
        h = h * valid_mask.to(h.dtype)
    n = h.shape[0]
    if scope == "batch":
        sums = h.sum().expand(n)
    elif scope == "image":
        sums = h.flatten(1).sum(1)
    elif n % group_size:
        raise ConfigError(f"hl group scope needs a batch divisible by group_size={group_size}, got {n} images")
    else:
        sums = h.view(n // group_size, -1).sum(1).repeat_interleave(group_size)
    # An image whose pixels are all masked out has S = 0; its weights stay 0 instead of NaN.
    return h / sums.clamp_min(1e-12).view(n, 1, 1)


def hardness_loss(pixel_loss: torch.Tensor, hl_logits: torch.Tensor, *, lam: float = 0.01, offset: float = 0.1,
                  scope: str = "batch", valid_mask: torch.Tensor | None = None, group_size: int = 2,
                  image_reduce: str = "mean") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (seg_loss, hl_loss, H) for per-pixel losses (N, H, W) and HL logits (N[,1], H, W).

    Args:
        pixel_loss: unreduced loss of the decode head at label resolution (0 at ignored pixels).
        hl_logits: raw HL-branch output D, already resized to the label size.
        scope: "batch" (the authors' code: one normaliser over the whole local batch), "image" (the paper
            figure's per-image formula) or "group" (per group of `group_size` images, losses averaged).
        valid_mask: None keeps ignored pixels in the normaliser as the authors do; a bool mask excludes them.
        image_reduce: how per-image / per-group losses combine: "mean" keeps the baseline's loss scale
            (uniform H gives the mean CE), "sum" is the literal figure (N times larger).
    """
    hl_shape = hl_logits.shape[:1] + hl_logits.shape[2:] if hl_logits.dim() == 4 else hl_logits.shape
    if pixel_loss.dim() != 3 or pixel_loss.shape != hl_shape:
        raise ValueError(f"pixel_loss must be (N,H,W) matching hl_logits; got {tuple(pixel_loss.shape)} "
                         f"and {tuple(hl_logits.shape)}")
    if image_reduce not in IMAGE_REDUCTIONS:
        raise ConfigError(f"hl image_reduce must be one of {IMAGE_REDUCTIONS}, got {image_reduce!r}")
    h = hardness_weights(hl_logits, offset=offset, scope=scope, valid_mask=valid_mask, group_size=group_size)
    pixel_loss = pixel_loss.float()
    seg_loss = (h.detach() * pixel_loss).sum()
    hl_loss = -lam * (h * pixel_loss.detach()).sum()
    if scope != "batch" and image_reduce == "mean":
        # Each image (group) sums to 1, so the plain sum is #images (#groups) times the baseline scale.
        parts = h.shape[0] if scope == "image" else h.shape[0] // group_size
        seg_loss, hl_loss = seg_loss / parts, hl_loss / parts
    return seg_loss, hl_loss, h


def hardness_map(hl_logits: torch.Tensor, offset: float = 0.1) -> torch.Tensor:
    """Unnormalised hardness h = sigmoid(D) + offset, the quantity drawn in HL maps and scored by AUROC."""
    if hl_logits.dim() == 4:
        hl_logits = hl_logits[:, 0]
    return torch.sigmoid(hl_logits.float()) + offset
