"""Our runs grouped over seeds: mean / std / n, "mean ± std (n)" strings and a Markdown table."""
from __future__ import annotations

import math

import pandas as pd

from hlbench.results_table import POINT_DIGITS, POINTS, REFERENCE_RULE_KEYS, markdown_table, mean_std_text

STATS = ("mean", "std", "n")


def aggregate(df: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """Per group of `by`: columns "<metric> mean", "<metric> std" (sample std, NaN for n=1), "<metric> n"."""
    missing = [c for c in [*by, *metrics] if c not in df.columns]
    if missing:
        raise KeyError(f"aggregate: columns {missing} not in the table (available: {list(df.columns)})")
    values = df[list(metrics)].apply(pd.to_numeric, errors="coerce")
    grouped = values.groupby([df[b] for b in by], dropna=False, sort=True)
    stats = {"mean": grouped.mean(), "std": grouped.std(), "n": grouped.count()}
    out = pd.DataFrame({f"{m} {s}": stats[s][m] for m in metrics for s in STATS})
    return out.reset_index()


def reference_rule_column(runs: pd.DataFrame) -> pd.Series:
    """hlbench.results_table.reference_rule_miou of every load_runs() row: the re-scored best mIoU where there is
    one, else the best."""
    rule = pd.Series(float("nan"), index=runs.index)
    for key in reversed(REFERENCE_RULE_KEYS):  # the first key wins where it has a value
        if key in runs.columns:
            rule = pd.to_numeric(runs[key], errors="coerce").fillna(rule)
    return rule


def format_mean_std(agg: pd.DataFrame, scale: float = POINTS, digits: int = POINT_DIGITS) -> pd.DataFrame:
    """aggregate() output -> group columns + one "mean ± std (n)" string column per metric (×100 by default)."""
    metrics = [c[:-len(" mean")] for c in agg.columns if c.endswith(" mean")]
    stat_cols = {f"{m} {s}" for m in metrics for s in STATS}
    out = agg[[c for c in agg.columns if c not in stat_cols]].copy()
    for m in metrics:
        out[m] = [mean_std_text(mu, sd, int(n), scale, digits)
                  for mu, sd, n in zip(agg[f"{m} mean"], agg[f"{m} std"], agg[f"{m} n"])]
    return out


def _cell(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_table(df: pd.DataFrame, digits: int = 2) -> str:
    """A Markdown pipe table of a data frame (no `tabulate` needed); floats with `digits` decimals."""
    return markdown_table([[str(c) for c in df.columns]] + [[_cell(v, digits) for v in row]
                                                           for row in df.itertuples(index=False)])
