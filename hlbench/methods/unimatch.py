"""UniMatch (Yang et al.), original version (LiheYoung/UniMatch 7292bac, arXiv v1), as in its `unimatch.py` and
`dataset/semi.py`: the model labels its own weak views; two strong views (each CutMix-ed with a second unlabeled
batch) and a feature-perturbed pass learn from those labels where the prediction is confident.

One iteration (its `unimatch.py` training loop):
  1. eval mode, no grad: predictions on the mix batch (a second, independently shuffled pass over the unlabeled
     set, used only as the CutMix source);
  2. two strong views of the unlabeled batch and of the mix batch; inside each image's box k, s_k shows the mix
     image's s_k;
  3. train mode: one forward on cat(labeled, weak) with feature perturbation, one on cat(s1, s2);
  4. pseudo-labels from the (detached) train-mode weak prediction, overwritten inside box k by the mix batch's;
  5. L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2, L_x the labelled OHEM loss, the others confidence-masked CE
     over the non-padded pixels.

No EMA teacher and no state beyond the model: the strong views and boxes come from torch's global RNG, which the
checkpoints save.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..hardness import hardness_loss
from ..models.heads import resize
from .base import Method, Stream, resolve_behaviour_flags
from .labelled_loss import LabelledLoss, reference_group, unlabeled_per_gpu
from .strong_aug import strong_view, unimatch_box

log = logging.getLogger("hlbench")

# behaviour -> flag values. UniMatch's training code matches its paper; the flag is about model selection: the
# reference keeps the best score across its evaluation modes (center crop before the last 20 epochs, sliding
# window after), `sliding_only` the best sliding-window score (`previous_best` in the original unimatch.py).
BEHAVIOURS = {"reference": {"eval_selection": "reference"}, "paper": {"eval_selection": "sliding_only"}}
FLAG_CHOICES = {"eval_selection": ("reference", "sliding_only")}
# eval.select_from values that implement each eval_selection (the evaluation side of the loop).
SELECT_FROM = {"reference": "all", "sliding_only": "final_protocol"}
UNSUP_STREAMS = ("s1", "s2", "fp")


def resolve_flags(method_cfg) -> dict:
    """The behaviour's flags with the user's non-null overrides applied; ValueError naming a bad value."""
    return resolve_behaviour_flags(method_cfg, BEHAVIOURS, FLAG_CHOICES, "UniMatch")


def paste_in_box(box: torch.Tensor, inside: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """`inside` where the N×H×W bool box is set, `outside` elsewhere; for images (N×C×H×W) and maps (N×H×W)."""
    return torch.where(box if outside.dim() == 3 else box[:, None], inside, outside)


def mixed_targets(box, weak: tuple[torch.Tensor, ...], mix: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The targets of a CutMix-ed strong view: (label, confidence, valid) of the weak image, replaced inside the box
    by the mix image's, whose pixels the box shows."""
    return tuple(paste_in_box(box, m, w) for w, m in zip(weak, mix))


def unsup_loss(pred: torch.Tensor, target: torch.Tensor, conf: torch.Tensor, valid: torch.Tensor,
               conf_thresh: float, group: int, hl_logits: torch.Tensor | None = None,
               hl_offset: float = 0.1) -> torch.Tensor:
    """UniMatch's unsupervised loss: sum of CE * 1[conf >= thresh] over the valid (non-padded) pixels divided by the
    number of valid pixels, confident or not, per reference GPU batch of `group` images, averaged over the groups
    (as DDP averages the GPUs' gradients).

    With `hl_logits` (the HL branch on the same images, at the same size) the per-group mean becomes the
    sg(H)-weighted sum with H normalised over the valid pixels of the group, so a uniform H gives the same loss.
    """
    ce = F.cross_entropy(pred.float(), target, reduction="none") * ((conf >= conf_thresh) & valid)
    if hl_logits is not None:
        weighted, _, _ = hardness_loss(ce, hl_logits, offset=hl_offset, scope="group", valid_mask=valid,
                                       group_size=group)
        return weighted
    # A group with no valid pixel contributes 0 (the reference would divide by 0).
    means = [c.sum() / v.sum().clamp_min(1) for c, v in zip(ce.split(group), valid.split(group))]
    return torch.stack(means).mean()


class UniMatch(Method):
    """UniMatch on the shared loop: streams labeled, unlabeled and mix (the unlabeled set again)."""

    name = "unimatch"
    hl_streams = ("sup",) + tuple(f"unimatch.{s}" for s in UNSUP_STREAMS)

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.method
        self.flags = resolve_flags(m)
        self.conf_thresh, self.cutmix_p = float(m.conf_thresh), float(m.cutmix_p)
        self.loss_weights = {k: float(m.loss_weights[k]) for k in ("x",) + UNSUP_STREAMS}
        self.total_scale = float(m.total_scale)
        self.hl_unsup = {s for s in UNSUP_STREAMS if f"unimatch.{s}" in self.hl_targets}

    def streams(self, datasets: dict) -> dict[str, Stream]:
        if "unlabeled" not in datasets:
            raise ConfigError(f"method=unimatch needs a semi-supervised data config (an unlabeled set); "
                              f"data.name={self.cfg.data.name!r} has only {sorted(datasets)}")
        unlabeled = int(self.cfg.method.unlabeled_batch)
        # The reference zips the unlabeled loader twice: the second pass is an independent shuffle of the same set.
        return {"labeled": Stream(datasets["train"], int(self.cfg.train.batch_size)),
                "unlabeled": Stream(datasets["unlabeled"], unlabeled, key="method.unlabeled_batch"),
                "mix": Stream(datasets["unlabeled"], unlabeled, key="method.unlabeled_batch")}

    def setup(self, model, plan) -> None:
        cfg = self.cfg
        self.loss = LabelledLoss(cfg, plan.per_device["labeled"], hl_weighted="sup" in self.hl_targets)
        self.align_corners = model.align_corners
        self.per_gpu_u, self.per_device_u = unlabeled_per_gpu(cfg), plan.per_device["unlabeled"]
        self.group_u = reference_group(self.per_device_u, self.per_gpu_u)
        if cfg.loss.name != "prob_ohem":
            log.warning("UniMatch's labelled loss is OHEM (loss.name=prob_ohem, 0.7 / 100000); this run uses "
                        "loss.name=%s", cfg.loss.name)

    def step(self, model, batches, it):
        x, y = batches["labeled"]["img"], batches["labeled"]["label"]
        u_w, m_w = batches["unlabeled"]["img"], batches["mix"]["img"]
        valid_w, valid_m = batches["unlabeled"]["pad"] == 0, batches["mix"]["pad"] == 0
        nl, nu, size = x.shape[0], u_w.shape[0], u_w.shape[-2:]
        group = self.group_u or nu
        mean, std = self.cfg.data.mean, self.cfg.data.std

        def up(logits):  # the reference's model returns logits at the crop size
            return resize(logits, size, self.align_corners)

        # 1. Pseudo-labels of the CutMix source, from the model in eval mode (BN running statistics).
        with torch.no_grad():
            model.eval()
            conf_m, label_m = up(model(m_w)["out"]).softmax(1).max(1)
            model.train()
        # 2. Strong views, each with its own draws; inside box k, s_k shows the mix image's s_k.
        boxes, views = [], []
        for _ in range(2):
            view, view_m = strong_view(u_w, mean, std), strong_view(m_w, mean, std)
            boxes.append(torch.stack([unimatch_box(*size, p=self.cutmix_p, device=u_w.device) for _ in range(nu)]))
            views.append(paste_in_box(boxes[-1], view_m, view))
        # 3. Train mode: the labeled and weak images with feature perturbation (one pass, BN over both halves),
        # then the two strong views together.
        out = model(torch.cat([x, u_w]), feature_perturbation=True)
        out_s = model(torch.cat(views))
        # 4. Pseudo-labels from the train-mode weak prediction, the mix batch's inside each box.
        conf_w, label_w = up(out["out"][nl:].detach()).softmax(1).max(1)
        weak, mix = (label_w, conf_w, valid_w), (label_m, conf_m, valid_m)
        targets = {"s1": mixed_targets(boxes[0], weak, mix), "s2": mixed_targets(boxes[1], weak, mix), "fp": weak}
        preds = dict(zip(("s1", "s2"), up(out_s["out"]).chunk(2)), fp=up(out["out_fp"][nl:]))
        # H of each stream comes from the HL branch on the images that stream's prediction saw.
        hl = dict(zip(("s1", "s2"), out_s["hl"].chunk(2)), fp=out["hl"][nl:]) if self.hl_unsup else {}

        # 5. Losses: L_x the labelled terms (HL-weighted with "sup" in hl.semisup.apply_to).
        labelled = self.loss({k: v[:nl] for k, v in out.items() if k != "out_fp"}, y, self.align_corners)
        logs = labelled.logs
        total = self.loss_weights["x"] * (labelled.seg + labelled.aux)
        for s in UNSUP_STREAMS:
            h = up(hl[s]) if s in self.hl_unsup else None
            logs[f"unsup.loss_{s}"] = unsup_loss(preds[s], *targets[s], self.conf_thresh, group, h,
                                                 self.cfg.hl.offset)
            total = total + self.loss_weights[s] * logs[f"unsup.loss_{s}"]
        # L_h trains only the HL branch: it keeps its own weight (hl.lam) outside UniMatch's halving.
        loss = self.total_scale * total + labelled.hl
        confident = (conf_w >= self.conf_thresh) & valid_w
        logs["unsup.mask_ratio"] = (confident.sum() / valid_w.sum().clamp_min(1)).detach()
        logs["loss"] = loss.detach()
        return loss, logs

    def select_from(self) -> str:
        return SELECT_FROM[self.flags["eval_selection"]]

    def grouping(self) -> str:
        """The labelled loss's per-GPU scope, and the unlabeled losses' denominators."""
        unsup = f"unlabeled device batch {self.per_device_u}, reference {self.per_gpu_u} per GPU: "
        if self.group_u:
            unsup += f"unsupervised denominators over {self.group_u} image(s)"
        else:
            unsup += "not a multiple, so the unsupervised denominators span the device batch"
        return f"{self.loss.grouping()}; {unsup}"

    def describe(self) -> dict:
        return {"method": self.name, "behaviour": self.cfg.method.behaviour, "flags": self.flags,
                "grouping": self.grouping(), "hl_variant": self.loss.variant(),
                "hl_streams": sorted(self.hl_targets)}

    def tags(self) -> list[str]:
        return [f"hl_variant:{self.loss.variant()}", f"unimatch:{self.cfg.method.behaviour}"]


__all__ = ["UniMatch", "mixed_targets", "paste_in_box", "resolve_flags", "unsup_loss"]
