"""How hlbench runs appear in W&B: name, group, job type, tags, and the summaries of the logged metrics.

Chosen so that W&B's default workspace already compares baseline vs HL per paper table: runs of one suite share
a group (W&B groups by it), the setting is the job type, and the tags say hl/baseline, method, model, data and
split, so "tags: hl" or "tags: split:u2pl/1_8" filters need no config digging. analysis.dashboard builds its
report from the same names.
"""
from __future__ import annotations

# (metric, summary aggregations): val/mIoU.max is the best evaluation, val/mIoU.last the final one.
METRIC_SUMMARIES = (
    ("train/loss", "min,last"),
    ("val/mIoU", "max,last"),
    ("val/fgIoU", "max,last"),   # logged only where the data set's table metric is fgIoU (data.metric)
    ("val/mAcc", "max,last"),
    ("val/aAcc", "max,last"),
    ("val/hl_auroc", "max,last"),
)
CLASS_IOU_SUMMARY = "max,last"
# Summary keys Tracker.write_summary writes from summary.json ("/"-flattened).
FINAL_MIOU, BEST_MIOU = "final/mIoU", "best/mIoU"
HL_TAG, BASELINE_TAG = "hl", "baseline"


def final_iou_key(class_name: str) -> str:
    return f"final/IoU/{class_name}"


def split_label(split: dict | None) -> str:
    """The split tag's value: the semi-supervised split's source (u2pl/1_8, seeded(0.125, 0)), else "full"."""
    return split["source"] if split else "full"


def run_group(experiment: str, suite: str | None, profile: str | None) -> str:
    """The suite (one paper table); a lone experiment joins the suite named by its folder (fullsup/x -> fullsup).

    A profile's dry runs get a group of their own, so a CPU smoke pass never sits in the real table's group.
    """
    group = suite or experiment.split("/")[0]
    return f"{group}-{profile}" if profile else group


def run_identity(cfg, experiment: str, suite: str | None, profile: str | None, *, pretrained: str,
                 method_tags=(), split: dict | None = None) -> dict:
    """wandb.init's name, group, job_type and tags for one run of `experiment` with cfg's seed."""
    name = experiment + (f"-{profile}" if profile else "") + f"-s{cfg.seed}"
    tags = [HL_TAG if cfg.hl.enabled else BASELINE_TAG, f"method:{cfg.method.name}", f"model:{cfg.model.name}",
            f"data:{cfg.data.name}", f"split:{split_label(split)}", f"setting:{cfg.setting}",
            f"pretrained:{pretrained}"] + ([f"profile:{profile}"] if profile else []) + list(method_tags)
    return {"name": name, "group": run_group(experiment, suite, profile), "job_type": cfg.setting,
            "tags": [t[:64] for t in tags]}  # W&B rejects tags longer than 64 characters


def val_iou_key(class_name: str) -> str:
    """The per-class IoU of a val line, as Tracker.log names it (metrics.jsonl's IoU.<class> under val/)."""
    return f"val/IoU.{class_name}"


def define_metrics(run, class_names=()) -> None:
    """Summary aggregations of the logged metrics (W&B keeps only the last value otherwise), per-class IoU included.

    define_metric reads "." as a nesting separator, so the dots of "val/IoU.<class>" are escaped; a glob such as
    "val/IoU.*" never matches such keys.
    """
    for name, summary in METRIC_SUMMARIES:
        run.define_metric(name, summary=summary)
    for c in class_names:
        run.define_metric(val_iou_key(c).replace(".", "\\."), summary=CLASS_IOU_SUMMARY)
