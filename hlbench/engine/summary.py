"""summary.json: one run's record, which the runner's tables, the analysis and the W&B summary read."""
from __future__ import annotations

import math

import numpy as np
import torch
from omegaconf import OmegaConf

from ..data.bad_samples import bad_sample_report
from ..metrics import TABLE_METRICS
from ..weights import pretrained_name


def summary_entry(it: int, metrics: dict, protocol: dict, checkpoint: str, network: str,
                  class_names: list[str]) -> dict:
    """One evaluation: `checkpoint` says which parameters (a file, or the final iteration's) and `network` which of
    the method's networks (student or teacher) produced it."""
    return {"iter": it, "mIoU": metrics["mIoU"], **{k: metrics[k] for k in TABLE_METRICS[1:] if k in metrics},
            "mAcc": metrics["mAcc"], "aAcc": metrics["aAcc"],
            "IoU": {c: metrics[f"IoU.{c}"] for c in class_names},
            "protocol": {**protocol, "checkpoint": checkpoint, "network": network}}


def report_iou(metrics: dict, classes: list[str]) -> float | None:
    """Mean IoU of the data set's report classes (e.g. the thin and small ones) that have a score."""
    vals = [metrics[f"IoU.{c}"] for c in classes if not math.isnan(metrics.get(f"IoU.{c}", math.nan))]
    return float(np.mean(vals)) if vals else None


def run_summary(cfg, meta: dict, parts, *, final: dict, protocol: dict, best: dict | None, train_time: float,
                start_it: int, step_times: list[float], skipped: list[int], identity: dict,
                device: torch.device) -> dict:
    """The summary of a finished run.

    Args:
        meta: experiment, suite, profile; parts: the run's RunParts; final: the final evaluation's result.
        protocol: the recipe's evaluation protocol; best: the selected evaluation (best.pth).
        train_time: seconds of training over every segment of the run; start_it: the iteration resumed from.
        step_times: s/iter of each logging window; skipped: the iterations skipped for a non-finite loss.
        identity: the W&B run's name, group, job type and tags (analysis.dashboard reads them).
    """
    total = int(cfg.train.iters)
    report_classes = list(cfg.data.get("report_classes") or [])
    return {
        "experiment": meta["experiment"], "suite": meta["suite"], "profile": meta.get("profile"),
        "seed": int(cfg.seed),
        "iters": total, "setting": cfg.setting, "method": cfg.method.name, "hl": bool(cfg.hl.enabled),
        "model": cfg.model.name, "data": cfg.data.name, "split": parts.split, "pretrained": pretrained_name(cfg),
        # the data set's table metric (data.metric), where it is not mIoU: the tables show that one
        **({"metric": cfg.data.metric} if cfg.data.get("metric", "mIoU") != "mIoU" else {}),
        "precision": cfg.train.precision,
        "train_time_s": round(train_time, 2), "resumed_from": start_it or None,
        "s_per_iter": float(np.median(step_times)) if step_times else None,
        "memory_mb": int(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
        "final": summary_entry(total, final["metrics"], protocol, f"final (iter {total})", final["network"],
                               parts.classes),
        "best": best,
        "hl_auroc": final["hl_auroc"],
        "hl_auroc_kinds": final["hl_auroc_kinds"],
        "hard_kinds": list(cfg.data.get("hard_kinds") or []),
        "report_classes": report_classes,
        "report_IoU": report_iou(final["metrics"], report_classes),
        "skipped_nonfinite": {"count": len(skipped), "iters": skipped},
        "bad_samples": bad_sample_report(parts.datasets),  # data.on_bad_sample=skip: files left out, per split
        "paper": OmegaConf.to_container(cfg.paper, resolve=True) if cfg.paper is not None else None,
        "batch": parts.plan.as_dict(),
        "wandb_run": identity,
        **parts.method.describe(),
    }
