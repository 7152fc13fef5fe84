"""Fully supervised training: one labelled stream, the labelled loss (HL-weighted when the model has HL)."""
from __future__ import annotations

from .base import Method, Stream
from .labelled_loss import LabelledLoss


class Supervised(Method):
    """mmseg's EncoderDecoder training step, and the authors' HL segmentor's when the model has an HL branch."""

    name = "supervised"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.loss: LabelledLoss | None = None
        self.align_corners = False

    def streams(self, datasets: dict) -> dict[str, Stream]:
        return {"labeled": Stream(datasets["train"], int(self.cfg.train.batch_size))}

    def setup(self, model, plan) -> None:
        self.loss = LabelledLoss(self.cfg, plan.per_device["labeled"], hl_weighted="sup" in self.hl_targets)
        self.align_corners = model.align_corners

    def step(self, model, batches, it):
        batch = batches["labeled"]
        # With hl.source=fixed the batch carries each image's stored HL map (data.hl_map_dir) for the loss.
        terms = self.loss(model(batch["img"]), batch["label"], self.align_corners, hl_map=batch.get("hl_map"))
        loss = terms.seg + terms.hl + terms.aux
        terms.logs["loss"] = loss.detach()  # mmseg's total of every logged loss
        return loss, terms.logs

    def describe(self) -> dict:
        return {"method": self.name, "grouping": self.loss.grouping(), "hl_variant": self.loss.variant()}

    def tags(self) -> list[str]:
        return [f"hl_variant:{self.loss.variant()}"]
