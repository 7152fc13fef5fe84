"""Fully supervised training step: decode loss (HL-weighted when the model has an HL branch) + auxiliary CE."""
from __future__ import annotations

import torch

from ..hardness import hardness_loss
from ..losses import make_pixel_loss, pixel_accuracy, pixel_cross_entropy, reduce_pixel_loss, resize_to

HL_IGNORE_MODES = ("keep", "exclude")


class Supervised:
    """Computes the losses of one labelled batch with mmseg's log keys.

    Keys: decode.loss_ce (the decode loss of `loss.name`, HL-weighted L_s when HL is on), decode.acc_seg,
    aux.loss_ce, aux.acc_seg, weight_loss (L_h), loss (their sum, like mmseg's total of every key containing
    "loss"). A cascade (OCRNet) logs decode_0.* (stage 0, x stage0_weight) and decode_1.* instead of decode.*.

    Args:
        stage0_weight: loss weight of a cascade's stage 0 (mmseg OCRNet: 0.4).
    """

    def __init__(self, hl, loss, ignore_index: int = 255, aux_weight: float = 0.4, stage0_weight: float = 0.4):
        if hl.ignore not in HL_IGNORE_MODES:
            raise ValueError(f"hl.ignore must be one of {HL_IGNORE_MODES}, got {hl.ignore!r}")
        self.hl = hl
        self.denominator = loss.ce_denominator
        self.decode_loss = make_pixel_loss(loss.name, ignore_index=ignore_index, class_weight=loss.class_weight,
                                           ohem_thresh=loss.ohem_thresh, ohem_min_kept=loss.ohem_min_kept,
                                           focal_gamma=loss.focal_gamma)
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight
        self.stage0_weight = stage0_weight

    def _hl_weighted(self, pixel_loss, hl_logits, label):
        valid = (label != self.ignore_index) if self.hl.ignore == "exclude" else None
        return hardness_loss(pixel_loss, hl_logits, lam=self.hl.lam, offset=self.hl.offset, scope=self.hl.scope,
                             valid_mask=valid, group_size=self.hl.group_size, image_reduce=self.hl.image_reduce)

    def _reduce(self, pixel_loss, label, weights):
        """Plain mean of a per-pixel loss, or its sg(H)-weighted sum when HL weights are given."""
        if weights is None:
            return reduce_pixel_loss(pixel_loss, label, self.ignore_index, self.denominator)
        return (weights.detach() * pixel_loss).sum() / _parts(weights, self.hl)

    def __call__(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        img, label = batch["img"], batch["label"]
        out = model(img)
        # The wrapped module under DDP carries the attributes.
        align = getattr(model, "module", model).align_corners
        size = label.shape[-2:]
        logs: dict[str, torch.Tensor] = {}

        # A cascade's last stage takes the decode role (HL's L_h uses it alone); earlier stages are only weighted.
        key = "decode_1" if "out0" in out else "decode"
        decode = resize_to(out["out"], size, align)
        decode_pix = self.decode_loss(decode, label)
        weights = None
        if "hl" in out:
            # Sigmoid + normalisation happen after the resize to the label size, as in the reference.
            hl_logits = resize_to(out["hl"], size, align)
            logs[f"{key}.loss_ce"], logs["weight_loss"], weights = self._hl_weighted(decode_pix, hl_logits, label)
        else:
            logs[f"{key}.loss_ce"] = self._reduce(decode_pix, label, None)
        logs[f"{key}.acc_seg"] = pixel_accuracy(decode.detach(), label, self.ignore_index)

        if "out0" in out:
            # The authors' cascade multiplies the same sg(H) into both stages' per-pixel losses (method §8).
            stage0 = resize_to(out["out0"], size, align)
            logs["decode_0.loss_ce"] = self._reduce(self.decode_loss(stage0, label), label, weights) * self.stage0_weight
            logs["decode_0.acc_seg"] = pixel_accuracy(stage0.detach(), label, self.ignore_index)

        if "aux" in out:
            aux = resize_to(out["aux"], size, align)
            aux_pix = pixel_cross_entropy(aux, label, self.ignore_index)
            aux_weights = weights if self.hl.weight_aux else None
            logs["aux.loss_ce"] = self._reduce(aux_pix, label, aux_weights) * self.aux_weight
            logs["aux.acc_seg"] = pixel_accuracy(aux.detach(), label, self.ignore_index)

        total = sum(v for k, v in logs.items() if "loss" in k)
        logs["loss"] = total.detach()
        return total, logs


def _parts(weights: torch.Tensor, hl) -> int:
    """How many normalisation scopes the weights span (their sum), for a mean-scaled weighted loss."""
    if hl.scope == "batch" or hl.image_reduce == "sum":
        return 1
    n = weights.shape[0]
    return n if hl.scope == "image" else n // hl.group_size
