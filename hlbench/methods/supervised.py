"""Fully supervised training step: decode CE (HL-weighted when the model has an HL branch) + auxiliary CE."""
from __future__ import annotations

import torch

from ..hardness import hardness_loss
from ..losses import pixel_accuracy, pixel_cross_entropy, reduce_pixel_loss, resize_to

HL_IGNORE_MODES = ("keep", "exclude")


class Supervised:
    """Computes the losses of one labelled batch with mmseg's log keys.

    Keys: decode.loss_ce (the HL-weighted L_s when HL is on), decode.acc_seg, aux.loss_ce, aux.acc_seg,
    weight_loss (L_h), loss (their sum, like mmseg's total of every key containing "loss").
    """

    def __init__(self, hl, loss, ignore_index: int = 255, aux_weight: float = 0.4):
        if hl.ignore not in HL_IGNORE_MODES:
            raise ValueError(f"hl.ignore must be one of {HL_IGNORE_MODES}, got {hl.ignore!r}")
        self.hl = hl
        self.denominator = loss.ce_denominator
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight

    def _hl_weighted(self, pixel_loss, hl_logits, label):
        valid = (label != self.ignore_index) if self.hl.ignore == "exclude" else None
        return hardness_loss(pixel_loss, hl_logits, lam=self.hl.lam, offset=self.hl.offset, scope=self.hl.scope,
                             valid_mask=valid, group_size=self.hl.group_size, image_reduce=self.hl.image_reduce)

    def __call__(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        img, label = batch["img"], batch["label"]
        out = model(img)
        # The wrapped module under DDP carries the attributes.
        align = getattr(model, "module", model).align_corners
        size = label.shape[-2:]
        logs: dict[str, torch.Tensor] = {}

        decode = resize_to(out["out"], size, align)
        decode_pix = pixel_cross_entropy(decode, label, self.ignore_index)
        if "hl" in out:
            # Sigmoid + normalisation happen after the resize to the label size, as in the reference.
            hl_logits = resize_to(out["hl"], size, align)
            logs["decode.loss_ce"], logs["weight_loss"], weights = self._hl_weighted(decode_pix, hl_logits, label)
        else:
            logs["decode.loss_ce"] = reduce_pixel_loss(decode_pix, label, self.ignore_index, self.denominator)
        logs["decode.acc_seg"] = pixel_accuracy(decode.detach(), label, self.ignore_index)

        if "aux" in out:
            aux = resize_to(out["aux"], size, align)
            aux_pix = pixel_cross_entropy(aux, label, self.ignore_index)
            if "hl" in out and self.hl.weight_aux:
                aux_loss = (weights.detach() * aux_pix).sum() / _parts(weights, self.hl)
            else:
                aux_loss = reduce_pixel_loss(aux_pix, label, self.ignore_index, self.denominator)
            logs["aux.loss_ce"] = aux_loss * self.aux_weight
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
