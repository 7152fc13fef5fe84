"""The loss of a labelled batch, which every method calls. It returns its terms apart (LabelledTerms): the decode
loss (HL-weighted when HL enters the labelled loss) with a cascade's stage-0 loss, the auxiliary loss, and L_h, which
trains the HL branch; each method adds them to its own terms where a reader sees it. Logged under mmseg's keys.

Per-GPU scope. The authors ran 4 GPUs x 2 images (ADE20K 4 x 4): each GPU normalised H over its own batch and
OHEM took its k-th probability over its own batch, and DDP averaged the GPUs' gradients. With another per-device
batch the same numbers come from computing both per group of the reference's per-GPU batch and averaging the
groups, so one GPU with 8 images reproduces 4 x 2 exactly (tests/test_reference_grouping.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..hardness import hardness_loss
from ..labels import IGNORE_INDEX
from ..losses import (LOSS_KEYS, kept_mean, make_pixel_loss, pixel_accuracy, pixel_cross_entropy,
                      prob_ohem_keep_mask, reduce_pixel_loss)
from ..models.build import aux_loss_weights
from ..models.heads import resize

log = logging.getLogger("hlbench")

HL_SCOPES = ("reference", "batch", "group", "image")
HL_IGNORE_MODES = ("keep", "exclude")
AUX_LOSSES = ("ce", "prob_ohem")
# With the references' OHEM (loss.name=prob_ohem): mask_then_normalise renormalises H over the kept pixels, so a
# uniform H gives that OHEM exactly; replace puts HL on plain CE, as the fully supervised loss table does.
HL_OHEM_MODES = ("mask_then_normalise", "replace")
# Where H comes from: online, the HL branch trained in the same run (the paper); fixed, the stored map of another
# run's HL branch that the batch carries as "hl_map" (data.hl_map_dir, hlbench/data/hl_maps.py), with no L_h.
HL_SOURCES = ("online", "fixed")
# The authors' HL knobs (hl_encoder_decoder.py, their configs) besides the normaliser's scope, which must equal
# their per-GPU batch.
HL_REFERENCE = {"lam": 0.01, "offset": 0.1, "ignore": "keep", "detach_features": True, "weight_aux": False,
                "lr_mult": 1.0, "head_channels": None}


def reference_group(per_device: int, reference_per_gpu: int) -> int | None:
    """Images per normaliser that reproduce the reference's per-GPU scope on this device, None when impossible.

    Possible exactly when the device batch is a whole number of reference GPU batches; a smaller device batch
    (e.g. 8 GPUs x 1 for a 4 x 2 recipe) cannot see the images another device holds.
    """
    return reference_per_gpu if per_device % reference_per_gpu == 0 else None


def unlabeled_per_gpu(cfg) -> int:
    """Unlabeled images per reference GPU: the references draw them in the proportion of the two global batches
    (U2PL 2 + 2, UniMatch 1 + 1 per GPU), so a shrunk run (profile=smoke) keeps the pairing."""
    return max(1, int(cfg.train.reference.per_gpu) * int(cfg.method.unlabeled_batch) // int(cfg.train.batch_size))


@dataclass
class LabelledTerms:
    """The labelled loss's terms, for the method to add.

    seg: the decode loss (HL-weighted where HL enters the labelled loss), plus a cascade's weighted stage-0 loss;
    aux: the auxiliary heads' weighted losses, summed (0 without one); hl: L_h, which trains only the HL branch (0
    without one); logs: mmseg's keys, decode.<loss key> (loss_ce or loss_focal), decode.acc_seg, aux.loss_ce,
    aux.acc_seg (a list of aux heads: aux_<i>.*), weight_loss (L_h); a cascade (OCRNet) logs decode_0.* (stage 0)
    and decode_1.* instead of decode.*.
    """
    seg: torch.Tensor
    aux: torch.Tensor
    hl: torch.Tensor
    logs: dict


class LabelledLoss:
    """LabelledTerms for a model output dict and labels.

    Args:
        cfg: the run config (hl, loss, train.reference, train.batch_size).
        per_device: images per device micro-batch, which decides the per-GPU grouping.
        hl_weighted: whether sg(H) weights the decode loss (the method's "sup" in hl.semisup.apply_to). Without it
            a model's HL branch still learns L_h from the labelled pixels' plain loss.

    With hl.source=fixed, H comes from the `hl_map` the call is given (the batch's stored map, already at label
    size) through the same hardness_loss as the online branch's D; its L_h is dropped, since nothing learns H.
    """

    def __init__(self, cfg, per_device: int, hl_weighted: bool = True, ignore_index: int = IGNORE_INDEX):
        self.hl, loss = cfg.hl, cfg.loss
        self.hl_weighted = hl_weighted
        self.fixed_map = bool(self.hl.enabled) and self.hl.get("source", "online") == "fixed"
        self.ignore_index = ignore_index
        self.per_device = per_device
        ref = cfg.train.reference
        self.reference = (int(ref.gpus), int(ref.per_gpu))
        self.global_batch = int(cfg.train.batch_size)
        self.group = reference_group(per_device, self.reference[1])
        self.loss_name, self.loss_key = loss.name, LOSS_KEYS[loss.name]
        self.denominator = loss.ce_denominator
        self.aux_weight, self.stage0_weight = float(loss.aux_weight), float(loss.stage0_weight)
        # Per aux output: a model config's list of aux heads may weight each (BiSeNetV2); else loss.aux_weight.
        self.aux_weights = aux_loss_weights(cfg.model, self.aux_weight) if "model" in cfg else {}
        self.focal_bug = bool(loss.focal_reference_bug)
        self.aux_name = loss.aux_name
        self.ohem = (float(loss.ohem_thresh), int(loss.ohem_min_kept))
        self.prob_ohem = loss.name == "prob_ohem" and not (self.hl.enabled and self.hl.semisup.ohem == "replace")
        self.decode_loss = make_pixel_loss(loss.name, ignore_index=ignore_index, class_weight=loss.class_weight,
                                           ohem_thresh=loss.ohem_thresh, ohem_min_kept=loss.ohem_min_kept,
                                           ohem_group=self.group, focal_gamma=loss.focal_gamma)
        self.scope, self.group_size = self._hl_scope()

    def _hl_scope(self) -> tuple[str, int]:
        """(hardness_loss scope, group size) for hl.scope; "reference" becomes groups of the reference batch."""
        scope = self.hl.scope
        if scope == "reference":
            return ("group", self.group) if self.group is not None else ("batch", self.per_device)
        return scope, int(self.hl.group_size)

    @property
    def normaliser_images(self) -> int:
        """Images that share one HL normaliser."""
        return {"batch": self.per_device, "image": 1}.get(self.scope, self.group_size)

    def grouping(self) -> str:
        """The start-up line's account of the per-GPU scope in force for the HL normaliser and OHEM."""
        gpus, per_gpu = self.reference
        parts = [f"reference {gpus} GPU(s) x {per_gpu}, device batch {self.per_device}"]
        if self.group is None:
            parts.append(f"not a multiple of {per_gpu}, so the reference per-GPU scope cannot be reproduced")
        if self.hl.enabled:
            parts.append(f"HL normaliser over {self.normaliser_images} image(s) (hl.scope={self.hl.scope})")
        if self.loss_name == "ohem":
            parts.append(f"OHEM threshold over {self.group or self.per_device} image(s)")
        return "; ".join(parts)

    def variant(self) -> str:
        """"reference" only when every HL knob and the normaliser's scope and the global batch equal the authors'."""
        if not self.hl.enabled:
            return "off"
        if self.fixed_map:
            return "fixed_map"
        gpus, per_gpu = self.reference
        same = (all(self.hl[k] == v for k, v in HL_REFERENCE.items()) and self.normaliser_images == per_gpu
                and self.global_batch == gpus * per_gpu and (self.scope == "batch" or self.hl.image_reduce == "mean"))
        return "reference" if same else "custom"

    def _parts(self, n: int) -> int:
        """Normalisation scopes in a batch of n (H sums to 1 over each), for a mean-scaled weighted loss."""
        if self.scope == "batch" or self.hl.image_reduce == "sum":
            return 1
        return n if self.scope == "image" else n // self.group_size

    def _reduce(self, pixel_loss, label, weights):
        """Plain mean of a per-pixel loss, or its sg(H)-weighted sum when HL weights are given."""
        if weights is None:
            if self.denominator == "valid_pixels" and self.group:
                # Each reference GPU divided by its own valid pixels: average those per-group means.
                return torch.stack([reduce_pixel_loss(p, y, self.ignore_index, self.denominator) for p, y in
                                    zip(pixel_loss.split(self.group), label.split(self.group))]).mean()
            return reduce_pixel_loss(pixel_loss, label, self.ignore_index, self.denominator)
        return (weights.detach() * pixel_loss).sum() / self._parts(label.shape[0])

    def _prob_ohem(self, logits, label):
        """(CE on the kept pixels, kept mask) of the semi-supervised references' OHEM, per reference GPU batch."""
        keep = prob_ohem_keep_mask(logits, label, self.ignore_index, *self.ohem, group=self.group)
        return pixel_cross_entropy(logits, label, self.ignore_index) * keep, keep

    def __call__(self, out: dict, label: torch.Tensor, align_corners: bool,
                 hl_map: torch.Tensor | None = None) -> LabelledTerms:
        size = label.shape[-2:]
        logs: dict[str, torch.Tensor] = {}
        # The authors' FocalSoftmax sets ignored labels to 0 in place (their focal_loss_softmax.py), so everything
        # computed after their decode loss, its accuracy and the aux head, sees void pixels as class 0.
        seen = label.masked_fill(label == self.ignore_index, 0) if self.focal_bug else label

        # A cascade's last stage takes the decode role (HL's L_h uses it alone); earlier stages are only weighted.
        head = "decode_1" if "out0" in out else "decode"
        decode = resize(out["out"], size, align_corners)
        decode_pix, keep = self._prob_ohem(decode, label) if self.prob_ohem else (self.decode_loss(decode, label), None)
        seg = weights = l_h = None
        hl_logits = out.get("hl")
        if self.fixed_map:
            if hl_map is None:
                raise ConfigError("hl.source=fixed, but the batch carries no stored HL map: set data.hl_map_dir to a "
                                  "folder of python -m hlbench.hlmap export (methods other than supervised do not "
                                  "pass it yet)")
            hl_logits = hl_map[:, None]
        if hl_logits is not None:
            # Sigmoid + normalisation happen after the resize to the label size, as in the reference.
            valid = (label != self.ignore_index) if self.hl.ignore == "exclude" else keep
            weighted, l_h, hl_weights = hardness_loss(
                decode_pix, resize(hl_logits, size, align_corners), lam=self.hl.lam, offset=self.hl.offset,
                scope=self.scope, valid_mask=valid, group_size=self.group_size, image_reduce=self.hl.image_reduce)
            if self.fixed_map:
                l_h = None  # a stored map is not trained: no L_h term
            if self.hl_weighted:
                seg, weights = weighted, hl_weights
        if seg is None:
            seg = kept_mean(decode_pix, keep, self.group) if keep is not None else self._reduce(decode_pix, label, None)
        logs[f"{head}.{self.loss_key}"] = seg
        if l_h is not None:
            logs["weight_loss"] = l_h
        logs[f"{head}.acc_seg"] = pixel_accuracy(decode.detach(), seen, self.ignore_index)

        if "out0" in out:
            # The authors' cascade multiplies the same sg(H) into both stages' per-pixel losses
            # (hl_cascade_encoder_decoder.py).
            stage0 = resize(out["out0"], size, align_corners)
            logs[f"decode_0.{self.loss_key}"] = self._reduce(self.decode_loss(stage0, label), label,
                                                             weights) * self.stage0_weight
            logs["decode_0.acc_seg"] = pixel_accuracy(stage0.detach(), label, self.ignore_index)
            seg = seg + logs[f"decode_0.{self.loss_key}"]

        zero = seg.new_zeros(())
        aux_terms = []
        # One aux head's "aux", or "aux_<i>" of each head of a list (models.segmentor.AuxiliaryHeads).
        for key in [k for k in out if k == "aux" or k.startswith("aux_")]:
            aux = resize(out[key], size, align_corners)
            loss_weight = self.aux_weights.get(key, self.aux_weight)
            if self.aux_name == "prob_ohem":  # U2PL: 0.4 x OHEM on the aux head too
                term = kept_mean(*self._prob_ohem(aux, seen), self.group) * loss_weight
            else:
                aux_pix = pixel_cross_entropy(aux, seen, self.ignore_index)
                aux_weights = weights if self.hl.weight_aux else None
                term = self._reduce(aux_pix, seen, aux_weights) * loss_weight
            logs[f"{key}.loss_ce"] = term
            logs[f"{key}.acc_seg"] = pixel_accuracy(aux.detach(), seen, self.ignore_index)
            aux_terms.append(term)
        aux_loss = sum(aux_terms) if aux_terms else zero
        return LabelledTerms(seg=seg, aux=aux_loss, hl=zero if l_h is None else l_h, logs=logs)
