"""Mask2Former's training step (mmseg 1.x Mask2FormerHead.loss), with a stored HL map inside its loss.

The label becomes one binary mask per class present (ignore 255 is no class: its pixels are negatives of every
mask, as mmseg's _seg_data_to_instance_data), the criterion matches queries to them and scores sampled points
(hlbench/methods/mask2former_criterion.py), and the loss dict is logged under mmseg's keys (decode.loss_cls,
decode.d0.loss_mask, ...). Evaluation is the model's semantic inference (Mask2FormerSegmentor), as mmseg's.

HL reaches Mask2Former only as a fixed map (the HL authors' README: "by using the HL map collected from PSPNet"):
with hl.enabled=true hl.source=fixed the batch carries each crop's stored map (data.hl_map_dir) and hl.fixed_map
says how it enters the loss. A baseline run (hl.enabled=false) is plain Mask2Former whatever hl.fixed_map holds.
"""
from __future__ import annotations

from dataclasses import asdict

from ..data.hl_maps import uses_fixed_hl_map
from .base import Method, Stream
from .labelled_loss import reference_group
from .mask2former_criterion import FixedMapOptions, Mask2FormerCriterion


def fixed_map_options(cfg) -> FixedMapOptions:
    """The run's FixedMapOptions: hl.fixed_map (its criterion keys) with hl.offset on an HL run, mode off otherwise.
    A bad value is a ConfigError naming the hl.fixed_map key (FixedMapOptions checks them)."""
    node = cfg.hl.fixed_map
    options = FixedMapOptions(mode=node.mode, targets=list(node.targets), normalise=node.normalise,
                              beta=float(node.beta), offset=float(cfg.hl.offset))
    if not uses_fixed_hl_map(cfg.hl):
        options.mode = "off"
    return options


class Mask2Former(Method):
    """One labelled stream through Mask2Former's criterion."""

    name = "mask2former"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.fixed_map = fixed_map_options(cfg)
        self.criterion: Mask2FormerCriterion | None = None
        self.group_size: int | None = None  # images per class-loss normaliser, known at setup

    def streams(self, datasets: dict) -> dict[str, Stream]:
        return {"labeled": Stream(datasets["train"], int(self.cfg.train.batch_size))}

    def setup(self, model, plan) -> None:
        # mmdet normalises the class loss per GPU: per group of the reference's per-GPU batch where this device's
        # batch holds whole groups, else over the device batch (mask losses are exact either way).
        self.group_size = reference_group(plan.per_device["labeled"], int(self.cfg.train.reference.per_gpu))
        self.criterion = Mask2FormerCriterion(model.num_classes, **dict(self.cfg.model.get("criterion") or {}),
                                              group_size=self.group_size, fixed_map=self.fixed_map)

    def step(self, model, batches, it):
        batch = batches["labeled"]
        out = model(batch["img"])
        hl_map = batch["hl_map"] if self.fixed_map.mode != "off" else None
        losses = self.criterion(out["cls"], out["masks"], batch["label"], hl_map=hl_map)
        loss = sum(losses.values())
        logs = {f"decode.{key}": value.detach() for key, value in losses.items()}
        logs["loss"] = loss.detach()  # mmseg's total of every logged loss
        return loss, logs

    def describe(self) -> dict:
        fixed = asdict(self.fixed_map)
        return {"method": self.name, "hl_variant": "fixed_map" if self.fixed_map.mode != "off" else "off",
                "hl_fixed_map": fixed, "class_loss_group": self.group_size}

    def tags(self) -> list[str]:
        f = self.fixed_map
        detail = {"point_weights": f"/{'+'.join(f.targets)}/{f.normalise}", "query_weights": f"/{'+'.join(f.targets)}",
                  "point_selection": f"/beta{f.beta:g}"}.get(f.mode, "")
        return [f"hl_variant:{self.describe()['hl_variant']}", f"hl_fixed_map:{f.mode}{detail}"]
