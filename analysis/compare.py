"""Baseline vs HL: per-class IoU Δ of one pair of runs, pairing runs by seed, and the Δ summary over pairs."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from analysis.runs import SUMMARY_FILE
from hlbench.tracking.run_folder import read_json

# A baseline and an HL run are comparable when only the HL switch differs between them (so a U2PL + HL run never
# pairs with a UniMatch baseline, nor a 1/8 run with a 1/4 one).
PAIR_KEYS = ["suite", "method.name", "model.name", "data.name", "data.split", "seed"]
DELTA_COLUMNS = ["class", "base IoU", "HL IoU", "Δ"]


def _iou(summary: dict, entry: str, who: str) -> dict:
    try:
        return summary[entry]["IoU"]
    except (KeyError, TypeError):
        raise KeyError(f"{who} summary has no '{entry}.IoU' (expected summary.json's per-class IoU dict)") from None


def per_class_delta(base_summary: dict, hl_summary: dict, entry: str = "final") -> pd.DataFrame:
    """class, base IoU, HL IoU, Δ = HL − base, in points (×100), largest Δ first; `entry` is final or best."""
    base, hl = _iou(base_summary, entry, "baseline"), _iou(hl_summary, entry, "HL")
    if set(base) != set(hl):
        raise ValueError(f"per_class_delta: class sets differ (baseline only {sorted(set(base) - set(hl))}, "
                         f"HL only {sorted(set(hl) - set(base))})")
    # summary.json stores an absent class's IoU as null; keep it as NaN so it sorts last instead of failing.
    num = {c: (math.nan if base[c] is None else 100 * base[c], math.nan if hl[c] is None else 100 * hl[c])
           for c in base}
    df = pd.DataFrame([(c, b, h, h - b) for c, (b, h) in num.items()], columns=DELTA_COLUMNS)
    return df.sort_values("Δ", ascending=False, kind="stable", na_position="last", ignore_index=True)


def pair_runs(runs: pd.DataFrame, suite: str | None = None) -> pd.DataFrame:
    """load_runs() table -> one row per (baseline, HL) pair sharing suite, model, data and seed.

    Columns: PAIR_KEYS, experiment_base, experiment_hl, run_dir_base, run_dir_hl. Several HL variants of one
    baseline each get their own row.
    """
    if runs.empty:
        return pd.DataFrame(columns=[*PAIR_KEYS, "experiment_base", "experiment_hl", "run_dir_base", "run_dir_hl"])
    if suite is not None:
        runs = runs[runs["suite"] == suite]
    hl = runs["hl.enabled"].fillna(False).astype(bool)
    cols = [*PAIR_KEYS, "experiment", "run_dir"]
    pairs = runs.loc[~hl, cols].merge(runs.loc[hl, cols], on=PAIR_KEYS, suffixes=("_base", "_hl"))
    return pairs.sort_values([*PAIR_KEYS, "experiment_hl"], ignore_index=True)


def pair_class_delta(pairs: pd.DataFrame, entry: str = "final") -> pd.DataFrame:
    """Per class over all pairs: mean base IoU, mean Δ, median Δ, improved "k/n"."""
    deltas = [per_class_delta(read_json(Path(b) / SUMMARY_FILE), read_json(Path(h) / SUMMARY_FILE), entry)
              for b, h in zip(pairs["run_dir_base"], pairs["run_dir_hl"])]
    return summarise_class_deltas(deltas)


def summarise_class_deltas(deltas: list[pd.DataFrame]) -> pd.DataFrame:
    """per_class_delta() tables of several pairs -> per class: mean base IoU, mean Δ, median Δ, improved "k/n"."""
    if not deltas:
        return pd.DataFrame(columns=["class", "mean base IoU", "mean Δ", "median Δ", "improved"])
    by_class = pd.concat(deltas).groupby("class", sort=False)
    out = pd.DataFrame({"mean base IoU": by_class["base IoU"].mean(), "mean Δ": by_class["Δ"].mean(),
                        "median Δ": by_class["Δ"].median(),
                        "improved": by_class["Δ"].agg(lambda d: f"{int((d > 0).sum())}/{d.notna().sum()}")})
    return out.sort_values("mean Δ", ascending=False).reset_index()
