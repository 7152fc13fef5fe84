"""Evaluation metrics: confusion-matrix IoU (mmseg `eval_metrics` semantics) and AUROC for HL maps."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from hlbench.errors import ConfigError
from hlbench.labels import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates a num_classes x num_classes confusion matrix (rows = ground truth), DDP-aware.

    update() never waits for the device: labels outside 0..num_classes-1 (other than ignore_index) are counted
    on the device and reported by compute(); the data sets' label check at start-up catches them earlier.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device=None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # One extra bin takes the ignored pixels, so no pixel has to be removed by a data-dependent index.
        self._counts = torch.zeros(num_classes * num_classes + 1, dtype=torch.int64, device=device)
        self.mat = self._counts[:-1].view(num_classes, num_classes)
        self._bad = torch.zeros(2, dtype=torch.int64, device=device)  # [count, largest bad value]

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        k = self.num_classes
        label = label.to(self._counts.device, torch.int64)
        pred = pred.to(self._counts.device, torch.int64)
        valid = label != self.ignore_index
        bad = valid & ((label < 0) | (label >= k))
        self._bad[0] += bad.sum()
        self._bad[1] = torch.maximum(self._bad[1], torch.where(bad, label, torch.iinfo(torch.int64).min).amax())
        idx = torch.where(valid & ~bad, label * k + pred, k * k).flatten()
        self._counts.index_add_(0, idx, torch.ones((), dtype=torch.int64, device=idx.device).expand(idx.numel()))

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._counts)
            count, value = self._bad.clone(), self._bad[1:].clone()
            dist.all_reduce(count)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            self._bad = torch.stack([count[0], value[0]])

    def check_labels(self) -> None:
        """ValueError naming a label value outside the classes, if any update saw one."""
        count, value = self._bad.tolist()
        if count:
            raise ConfigError(f"label value {value} outside 0..{self.num_classes - 1} (and not ignore "
                              f"{self.ignore_index}) at {count} pixel(s): are the labels mapped to train ids?")

    def compute(self, class_names: list[str] | None = None) -> dict:
        """mmseg-style metrics as fractions: aAcc, mIoU, mAcc, IoU.<class>, Acc.<class>.

        Classes absent from both ground truth and prediction give NaN IoU and are skipped by mIoU, as in mmseg.
        """
        self.check_labels()
        mat = self.mat.double().cpu()
        inter = mat.diag()
        gt_area, pred_area = mat.sum(1), mat.sum(0)
        union = gt_area + pred_area - inter
        iou = inter / union          # 0/0 -> NaN for classes never seen
        acc = inter / gt_area
        names = class_names or [str(i) for i in range(self.num_classes)]
        out = {"aAcc": (inter.sum() / gt_area.sum().clamp_min(1)).item(),
               "mIoU": _nanmean(iou), "mAcc": _nanmean(acc)}
        out.update({f"IoU.{n}": iou[i].item() for i, n in enumerate(names)})
        out.update({f"Acc.{n}": acc[i].item() for i, n in enumerate(names)})
        return out


# The metric a data set's tables report (data.metric; mIoU when it names none). fgIoU is the IoU of the foreground
# class of a background/foreground data set: TotalText's published number (IoU.Character, the HL authors' README),
# which the evaluation then records next to mIoU.
TABLE_METRICS = ("mIoU", "fgIoU")


def check_table_metric(name: str, num_classes: int) -> None:
    """ConfigError naming data.metric unless it is a table metric the data set's classes allow."""
    if name not in TABLE_METRICS:
        raise ConfigError(f"data.metric={name!r} is not valid; expected one of {', '.join(TABLE_METRICS)}")
    if name == "fgIoU" and num_classes != 2:
        raise ConfigError(f"data.metric=fgIoU needs two classes (background, foreground), the data set has "
                          f"{num_classes}")


def declared_metrics(metrics: dict, name: str, class_names: list[str]) -> dict:
    """What table metric `name` adds to compute()'s metrics: {} for mIoU, {"fgIoU": IoU of the second class} for
    a background/foreground data set."""
    check_table_metric(name, len(class_names))
    return {"fgIoU": metrics[f"IoU.{class_names[1]}"]} if name == "fgIoU" else {}


def table_metric(entry: dict) -> str:
    """The table metric of an evaluation (metrics or a summary entry): the declared one it holds, else mIoU."""
    return next((name for name in TABLE_METRICS[1:] if name in entry), "mIoU")


def _nanmean(x: torch.Tensor) -> float:
    keep = ~torch.isnan(x)
    return x[keep].mean().item() if keep.any() else math.nan


def binary_auroc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` ranking positives (targets true) above negatives.

    Mann–Whitney U with average ranks for ties, so a constant score gives exactly 0.5.
    """
    scores = scores.flatten().double()
    targets = targets.flatten().bool()
    n_pos = int(targets.sum())
    n_neg = targets.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # Average the ranks within runs of tied scores.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    u = ranks[targets].sum() - n_pos * (n_pos + 1) / 2
    return (u / (n_pos * n_neg)).item()
