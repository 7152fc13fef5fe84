"""Per-pixel segmentation losses and their reductions.

mmseg 0.x (the reference for every baseline) averages the unreduced CE over *all* pixels, ignored ones
included (mmseg 0.22's cross_entropy_loss.py), whereas PyTorch's `reduction="mean"` divides by the valid pixels
only. Both are offered; baseline and HL runs must use the same one for a fair comparison.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .labels import IGNORE_INDEX

log = logging.getLogger(__name__)

DENOMINATORS = ("all_pixels", "valid_pixels")


def pixel_cross_entropy(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                        class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Unreduced CE (N, H, W) in fp32, 0 at ignored pixels; logits must already be at label size."""
    return F.cross_entropy(logits.float(), label, weight=class_weight, ignore_index=ignore_index, reduction="none")


def reduce_pixel_loss(pixel_loss: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                      denominator: str = "all_pixels") -> torch.Tensor:
    """Mean of a per-pixel loss over all pixels (mmseg 0.x) or over the valid ones (PyTorch default)."""
    if denominator == "all_pixels":
        return pixel_loss.mean()
    if denominator == "valid_pixels":
        return pixel_loss.sum() / (label != ignore_index).sum().clamp_min(1)
    raise ConfigError(f"loss.ce_denominator must be one of {DENOMINATORS}, got {denominator!r}")


def pixel_accuracy(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Top-1 accuracy in percent over valid pixels (mmseg's `acc_seg`)."""
    valid = label != ignore_index
    correct = (logits.argmax(1) == label) & valid
    return correct.sum() * 100.0 / valid.sum().clamp_min(1)


# prob_ohem: the semi-supervised references' OHEM (prob_ohem_keep_mask, a mean over the kept pixels).
LOSS_NAMES = ("ce", "balanced_ce", "ohem", "focal", "prob_ohem")
# The decode loss's log key, as mmseg names it: OHEM is a pixel sampler on CrossEntropyLoss (the authors' OHEM logs
# say decode.loss_ce), balanced CE is CrossEntropyLoss with class weights; focal is mmseg FocalLoss's name.
LOSS_KEYS = {"ce": "loss_ce", "balanced_ce": "loss_ce", "ohem": "loss_ce", "focal": "loss_focal",
             "prob_ohem": "loss_ce"}


def pixel_focal_loss(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                     gamma: float = 2.0) -> torch.Tensor:
    """Unreduced softmax focal loss -(1 - p_t)^gamma log p_t (N, H, W) in fp32, 0 at ignored pixels.

    The authors' FocalSoftmax computes 2 * alpha * (1 - p_t)^gamma * CE with gamma = 2, alpha = 0.5: the same loss.
    """
    ce = pixel_cross_entropy(logits, label, ignore_index)
    return (1 - torch.exp(-ce)) ** gamma * ce  # p_t = exp(-ce); ignored pixels have ce = 0


def _true_class_prob(logits: torch.Tensor, label: torch.Tensor, ignore_index: int, group: int | None):
    """(valid mask, softmax probability of the true class, images per group) for the OHEM samplers."""
    n = label.shape[0]
    group = group or n
    if n % group:
        raise ConfigError(f"OHEM groups of {group} images need a batch divisible by {group}, got {n} images")
    valid = label != ignore_index
    return valid, logits.float().softmax(1).gather(1, label.where(valid, 0).unsqueeze(1)).squeeze(1), group


def _kth_smallest_valid(values: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest (1-based) of values[valid], or the largest valid value when fewer are valid, as a
    0-dim tensor (-inf when none is); without reading the count on the host, so the step never waits on the GPU.
    """
    values, valid = values.flatten(), valid.flatten()
    largest = torch.where(valid, values, -torch.inf).amax()
    if k > values.numel():
        return largest
    kth = torch.where(valid, values, torch.inf).kthvalue(k).values  # invalid pixels sort last
    return torch.where(valid.sum() >= k, kth, largest)


@torch.no_grad()
def ohem_keep_mask(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX, thresh: float = 0.7,
                   min_kept: int = 100000, group: int | None = None) -> torch.Tensor:
    """Bool (N, H, W) of the valid pixels mmseg's OHEMPixelSampler keeps (logits at label size).

    A pixel is kept when its softmax probability of the true class is below max(thresh, p_k), p_k being the
    k-th smallest such probability with k = min(min_kept * n, #valid - 1) (0-based) over the n images the
    sampler sees: mmseg scales min_kept by the images of one GPU's batch. `group` emulates that scope: the
    threshold is computed per group of `group` images (None: one threshold for the whole batch).
    """
    valid, true_prob, group = _true_class_prob(logits, label, ignore_index, group)
    n = label.shape[0]
    keep = torch.zeros_like(valid)
    for start in range(0, n, group):
        part = slice(start, start + group)
        kth = _kth_smallest_valid(true_prob[part], valid[part], min_kept * group + 1)
        keep[part] = valid[part] & (true_prob[part] < torch.clamp(kth, min=thresh))
    return keep


@torch.no_grad()
def prob_ohem_keep_mask(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                        thresh: float = 0.7, min_kept: int = 100000, group: int | None = None) -> torch.Tensor:
    """Bool (N, H, W) of the pixels the semi-supervised references' OHEM keeps (U2PL / UniMatch
    ProbOhemCrossEntropy2d; logits at label size), per group of `group` images (their per-GPU batch).

    Unlike mmseg's sampler: with fewer than `min_kept` valid pixels every valid pixel is kept; otherwise the
    threshold is max(thresh, the min_kept-th smallest true-class probability) and pixels at or below it are kept.
    """
    valid, true_prob, group = _true_class_prob(logits, label, ignore_index, group)
    n = label.shape[0]
    keep = valid.clone()
    if min_kept <= 0:
        return keep
    for start in range(0, n, group):
        part = slice(start, start + group)
        if true_prob[part].numel() < min_kept:
            continue  # fewer pixels than min_kept: every valid pixel stays
        kth = _kth_smallest_valid(true_prob[part], valid[part], min_kept)
        few = valid[part].sum() < min_kept
        keep[part] &= few | (true_prob[part] <= torch.clamp(kth, min=thresh))
    return keep


def kept_mean(pixel_loss: torch.Tensor, keep: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """Mean of a per-pixel loss over the kept pixels of each group of images, averaged over the groups (what
    per-GPU means averaged by DDP give)."""
    group = group or pixel_loss.shape[0]
    means = [(p * k).sum() / k.sum().clamp_min(1) for p, k in zip(pixel_loss.split(group), keep.split(group))]
    return torch.stack(means).mean()


def make_pixel_loss(name: str = "ce", *, ignore_index: int = IGNORE_INDEX, class_weight=None, ohem_thresh: float = 0.7,
                    ohem_min_kept: int = 100000, ohem_group: int | None = None, focal_gamma: float = 2.0):
    """The decode head's per-pixel loss, a function (logits at label size, label) -> (N, H, W) fp32.

    Every variant is 0 at ignored pixels, so the usual reductions and HL weighting apply unchanged; like
    mmseg 0.x, balanced CE and OHEM keep the all-pixel mean (class weights / the OHEM mask scale each pixel).
    `ohem_group`: images per OHEM threshold (the reference's per-GPU batch; see ohem_keep_mask).
    """
    if name not in LOSS_NAMES:
        raise ConfigError(f"loss.name must be one of {LOSS_NAMES}, got {name!r}")
    if name == "balanced_ce" and not class_weight:
        # e.g. a profile=smoke dry run of the loss table on synthetic data: same code path, uniform weights.
        log.warning("loss.name=balanced_ce without loss.class_weight (nor data.class_weight): uniform weights")
    if name in ("ce", "prob_ohem"):  # prob_ohem's pixel selection and mean belong to its caller (LabelledLoss)
        return lambda logits, label: pixel_cross_entropy(logits, label, ignore_index)
    if name == "focal":
        return lambda logits, label: pixel_focal_loss(logits, label, ignore_index, focal_gamma)
    if name == "ohem":
        return lambda logits, label: pixel_cross_entropy(logits, label, ignore_index) * ohem_keep_mask(
            logits, label, ignore_index, ohem_thresh, ohem_min_kept, ohem_group)
    weights = list(class_weight or [])

    def balanced_ce(logits, label):
        if not weights:
            return pixel_cross_entropy(logits, label, ignore_index)
        if len(weights) != logits.shape[1]:
            raise ConfigError(f"loss.class_weight has {len(weights)} entries, the model {logits.shape[1]} classes")
        return pixel_cross_entropy(logits, label, ignore_index, logits.new_tensor(weights, dtype=torch.float32))
    return balanced_ce
