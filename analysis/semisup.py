"""Semi-supervised runs as the paper lays them out: rows = methods, columns = label splits, mean ± std (n) over seeds.

The row and column of a run come from its expected-results card (paper.row / paper.column, e.g. "U2PL + HL" and
"1/8"); runs without a card (the synthetic study) use the experiment's name and the split's source. Two rules
are tabulated: the references' (U2PL and UniMatch report their selected checkpoint; where another protocol
selected it, its re-scored number: hlbench.results_table.reference_rule_miou) and the last iteration.
"""
from __future__ import annotations

import pandas as pd

from analysis.runs import find_run_dirs, newest_per_seed
from analysis.tables import aggregate, format_mean_std, reference_rule_column

RULES = {"reference rule": "reference_rule.mIoU", "last iteration": "final.mIoU"}


def _column(runs: pd.DataFrame, name: str) -> pd.Series:
    return runs[name] if name in runs.columns else pd.Series(None, index=runs.index, dtype=object)


def semisup_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The load_runs() rows of semi-supervised runs (those with a split record), with row, column and
    reference_rule.mIoU added."""
    runs = runs[_column(runs, "split.source").notna()].copy()
    runs["row"] = _column(runs, "paper.row").fillna(runs["experiment"])
    runs["column"] = _column(runs, "paper.column").fillna(_column(runs, "split.source"))
    runs["reference_rule.mIoU"] = reference_rule_column(runs)
    return runs


def methods_by_split(runs: pd.DataFrame, rule: str = "reference rule") -> pd.DataFrame:
    """Method × split table of "mean ± std (n)" strings in points, in the runs' order; "" where a cell has no run."""
    if rule not in RULES:
        raise KeyError(f"methods_by_split: rule {rule!r}; expected one of {list(RULES)}")
    runs = semisup_runs(runs)
    if runs.empty:
        return pd.DataFrame(index=pd.Index([], name="method"))
    cells = format_mean_std(aggregate(runs, by=["row", "column"], metrics=[RULES[rule]]))
    table = cells.pivot(index="row", columns="column", values=RULES[rule])
    table = table.reindex(index=list(dict.fromkeys(runs["row"])), columns=list(dict.fromkeys(runs["column"])))
    return table.fillna("").rename_axis(index="method", columns="split")


def methods_by_class(runs: pd.DataFrame, column: str | None = None, entry: str = "final") -> pd.DataFrame:
    """Method × class table of mean IoU over seeds (points) at `entry` ("final" or "best"), for the runs of one
    split column (the only one when None): where a method gains or loses against SupOnly, class by class."""
    runs = semisup_runs(runs)
    columns = list(dict.fromkeys(runs["column"]))
    if column is None and len(columns) > 1:
        raise ValueError(f"methods_by_class: the runs cover splits {columns}; name one with column=")
    runs = runs if column is None else runs[runs["column"] == column]
    prefix = f"{entry}.IoU."
    classes = [c for c in runs.columns if c.startswith(prefix) and runs[c].notna().any()]
    if runs.empty or not classes:
        return pd.DataFrame(index=pd.Index([], name="method"))
    values = runs[classes].apply(pd.to_numeric, errors="coerce").mul(100)
    table = values.groupby(runs["row"], sort=False).mean().round(1)
    return table.rename(columns=lambda c: c[len(prefix):]).rename_axis(index="method", columns="class")


def read_summaries(root, suite: str | None = None) -> list[dict]:
    """summary.json of every run folder below `root` (of `suite` only, when given), with run_dir added: the input
    of hlbench.report's tables. One per (experiment, seed), as load_runs counts them (newest_per_seed)."""
    out = []
    for run_dir, summary in newest_per_seed(find_run_dirs(root))[0]:
        if suite is None or summary.get("suite") == suite:
            out.append({**summary, "run_dir": str(run_dir)})
    return out
