"""HL stability during training: rank correlation of consecutive HL / CE-loss snapshots (project diagnostic).

The paper shows (Fig. 1, no number) that the CE loss map of a hard region fades as the network fits it while
the learned HL map keeps marking it. hlbench quantifies that on the K fixed val images whose maps the trainer
stores every `train.hl_map_interval` iterations (hl_maps/maps_<iter>.npz).
"""
from __future__ import annotations


import numpy as np
import pandas as pd
import torch

from hlbench.errors import BadFileError
from hlbench.labels import IGNORE_INDEX
from hlbench.metrics import binary_auroc
from hlbench.tracking.snapshots import load_snapshot, snapshot_paths

COLUMNS = ["iter", "prev_iter", "hl_rank_corr", "loss_rank_corr", "hl_auroc_vs_hard", "loss_auroc_vs_hard"]


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, tied values sharing their average rank (as Spearman's rho needs)."""
    return pd.Series(np.asarray(values, dtype=np.float64)).rank(method="average").to_numpy()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equally long 1-D arrays; NaN when either is constant or empty."""
    a, b = np.ravel(a), np.ravel(b)
    if a.shape != b.shape:
        raise ValueError(f"spearman: arrays differ in size ({a.size} vs {b.size})")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def _per_image_corr(prev: np.ndarray, cur: np.ndarray, valid: np.ndarray) -> float:
    # Ignored pixels are left out: their CE loss is exactly 0, a block of ties that would inflate the correlation.
    corrs = [spearman(p[v], c[v]) for p, c, v in zip(prev, cur, valid)]
    corrs = [c for c in corrs if not np.isnan(c)]
    return float(np.mean(corrs)) if corrs else float("nan")


def _auroc_vs_hard(scores: np.ndarray, hard: np.ndarray, valid: np.ndarray) -> float:
    return binary_auroc(torch.from_numpy(scores[valid]), torch.from_numpy(hard[valid] > 0))


def snapshot_stability(run_dir, ignore_index: int = IGNORE_INDEX) -> pd.DataFrame:
    """One row per consecutive pair of HL-map snapshots of a run.

    Columns: iter, prev_iter, hl_rank_corr / loss_rank_corr (Spearman between the two snapshots, per image over
    labelled pixels, averaged over the K images), hl_auroc_vs_hard / loss_auroc_vs_hard (AUROC of snapshot
    `iter` against the ground-truth hard bitmask, labelled pixels pooled over the K images).
    Empty (with these columns) when the run has fewer than two snapshots, e.g. a baseline run.
    """
    rows = []
    paths = snapshot_paths(run_dir)
    prev_it, prev = None, None
    for it, path in paths:
        cur = load_snapshot(path)
        if prev is not None:
            if prev["label"].shape != cur["label"].shape or not np.array_equal(prev["label"], cur["label"]):
                raise BadFileError(f"{path}: not the same images as maps_{prev_it:06d}.npz (labels differ)")
            valid = cur["label"] != ignore_index
            rows.append({"iter": it, "prev_iter": prev_it,
                         "hl_rank_corr": _per_image_corr(prev["hl"], cur["hl"], valid),
                         "loss_rank_corr": _per_image_corr(prev["loss"], cur["loss"], valid),
                         "hl_auroc_vs_hard": _auroc_vs_hard(cur["hl"], cur["hard"], valid),
                         "loss_auroc_vs_hard": _auroc_vs_hard(cur["loss"], cur["hard"], valid)})
        prev_it, prev = it, cur
    return pd.DataFrame(rows, columns=COLUMNS)
