"""Per-pixel segmentation losses and their reductions.

mmseg 0.x (the reference for every baseline) averages the unreduced CE over *all* pixels, ignored ones
included, whereas PyTorch's `reduction="mean"` divides by the valid pixels only (method.md §5). Both are
offered; baseline and HL runs must use the same one for a fair comparison.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DENOMINATORS = ("all_pixels", "valid_pixels")


def resize_to(logits: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    """Bilinearly resize decoder-resolution logits to the label size (no-op when already there)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=align_corners)


def pixel_cross_entropy(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255,
                        class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Unreduced CE (N, H, W) in fp32, 0 at ignored pixels; logits must already be at label size."""
    return F.cross_entropy(logits.float(), label, weight=class_weight, ignore_index=ignore_index, reduction="none")


def reduce_pixel_loss(pixel_loss: torch.Tensor, label: torch.Tensor, ignore_index: int = 255,
                      denominator: str = "all_pixels") -> torch.Tensor:
    """Mean of a per-pixel loss over all pixels (mmseg 0.x) or over the valid ones (PyTorch default)."""
    if denominator == "all_pixels":
        return pixel_loss.mean()
    if denominator == "valid_pixels":
        return pixel_loss.sum() / (label != ignore_index).sum().clamp_min(1)
    raise ValueError(f"loss.ce_denominator must be one of {DENOMINATORS}, got {denominator!r}")


def pixel_accuracy(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Top-1 accuracy in percent over valid pixels (mmseg's `acc_seg`)."""
    valid = label != ignore_index
    correct = (logits.argmax(1) == label) & valid
    return correct.sum() * 100.0 / valid.sum().clamp_min(1)
