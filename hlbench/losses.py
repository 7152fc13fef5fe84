"""Per-pixel segmentation losses and their reductions.

mmseg 0.x (the reference for every baseline) averages the unreduced CE over *all* pixels, ignored ones
included, whereas PyTorch's `reduction="mean"` divides by the valid pixels only (method.md §5). Both are
offered; baseline and HL runs must use the same one for a fair comparison.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

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


LOSS_NAMES = ("ce", "balanced_ce", "ohem", "focal")


def pixel_focal_loss(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255,
                     gamma: float = 2.0) -> torch.Tensor:
    """Unreduced softmax focal loss -(1 - p_t)^gamma log p_t (N, H, W) in fp32, 0 at ignored pixels."""
    ce = pixel_cross_entropy(logits, label, ignore_index)
    return (1 - torch.exp(-ce)) ** gamma * ce  # p_t = exp(-ce); ignored pixels have ce = 0


@torch.no_grad()
def ohem_keep_mask(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255, thresh: float = 0.7,
                   min_kept: int = 100000) -> torch.Tensor:
    """Bool (N, H, W) of the valid pixels mmseg's OHEMPixelSampler keeps (logits at label size).

    A pixel is kept when its softmax probability of the true class is below max(thresh, p_k), p_k being the
    k-th smallest such probability with k = min(min_kept * N, #valid - 1): mmseg scales min_kept by the images
    in the device batch, so at least that many of the hardest pixels survive a lenient threshold.
    """
    valid = label != ignore_index
    true_prob = logits.float().softmax(1).gather(1, label.where(valid, 0).unsqueeze(1)).squeeze(1)
    probs = true_prob[valid].sort().values
    if probs.numel() == 0:
        return valid
    kth = probs[min(min_kept * label.shape[0], probs.numel() - 1)]
    return valid & (true_prob < torch.clamp(kth, min=thresh))


def make_pixel_loss(name: str = "ce", *, ignore_index: int = 255, class_weight=None, ohem_thresh: float = 0.7,
                    ohem_min_kept: int = 100000, focal_gamma: float = 2.0):
    """The decode head's per-pixel loss, a function (logits at label size, label) -> (N, H, W) fp32.

    Every variant is 0 at ignored pixels, so the usual reductions and HL weighting apply unchanged; like
    mmseg 0.x, balanced CE and OHEM keep the all-pixel mean (class weights / the OHEM mask scale each pixel).
    """
    if name not in LOSS_NAMES:
        raise ValueError(f"loss.name must be one of {LOSS_NAMES}, got {name!r}")
    if name == "balanced_ce" and not class_weight:
        # e.g. a profile=smoke dry run of the loss table on synthetic data: same code path, uniform weights.
        log.warning("loss.name=balanced_ce without loss.class_weight (nor data.class_weight): uniform weights")
    if name == "ce":
        return lambda logits, label: pixel_cross_entropy(logits, label, ignore_index)
    if name == "focal":
        return lambda logits, label: pixel_focal_loss(logits, label, ignore_index, focal_gamma)
    if name == "ohem":
        return lambda logits, label: pixel_cross_entropy(logits, label, ignore_index) * ohem_keep_mask(
            logits, label, ignore_index, ohem_thresh, ohem_min_kept)
    weights = list(class_weight or [])

    def balanced_ce(logits, label):
        if not weights:
            return pixel_cross_entropy(logits, label, ignore_index)
        if len(weights) != logits.shape[1]:
            raise ValueError(f"loss.class_weight has {len(weights)} entries, the model {logits.shape[1]} classes")
        return pixel_cross_entropy(logits, label, ignore_index, logits.new_tensor(weights, dtype=torch.float32))
    return balanced_ce
