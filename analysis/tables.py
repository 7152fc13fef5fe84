"""Group runs over seeds: mean / std / n, "mean ± std (n)" strings and a plain-text table.

Also the command line that rebuilds the HL authors' paper tables from their logs (analysis.paper_tables):
    python -m analysis.tables <logs dir> --out DIR
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

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


def _mean_std(mean: float, std: float, n: int, scale: float, digits: int) -> str:
    """"62.0 ± 2.8 (2)"; one sample has no spread: "70.0 (1)"; no sample: "–"."""
    if n == 0:
        return "–"
    if n == 1 or math.isnan(std):
        return f"{mean * scale:.{digits}f} ({n})"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f} ({n})"


def format_mean_std(agg: pd.DataFrame, scale: float = 100.0, digits: int = 1) -> pd.DataFrame:
    """aggregate() output -> group columns + one "mean ± std (n)" string column per metric (×100 by default)."""
    metrics = [c[:-len(" mean")] for c in agg.columns if c.endswith(" mean")]
    stat_cols = {f"{m} {s}" for m in metrics for s in STATS}
    out = agg[[c for c in agg.columns if c not in stat_cols]].copy()
    for m in metrics:
        out[m] = [_mean_std(mu, sd, int(n), scale, digits)
                  for mu, sd, n in zip(agg[f"{m} mean"], agg[f"{m} std"], agg[f"{m} n"])]
    return out


def _cell(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_table(df: pd.DataFrame, digits: int = 2) -> str:
    """Fixed-width Markdown pipe table (no `tabulate` needed); floats with `digits` decimals. A "|" inside a cell
    is escaped, so every cell stays one Markdown cell."""
    rows = [[str(c) for c in df.columns]]
    rows += [[_cell(v, digits) for v in row] for row in df.itertuples(index=False)]
    rows = [[c.replace("|", "\\|") for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.tables",
        description="Rebuild every table of a folder laid out like the HL authors' logs/ (sub-folders whose "
                    "README.md table cells link to log files) from the logs, with Δ, mean Δ and a check column.")
    parser.add_argument("logs", type=Path, help="the logs folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the CSV and Markdown tables")
    args = parser.parse_args(argv)
    from analysis.paper_tables import write_paper_tables  # it imports format_table from here
    from hlbench.errors import ConfigError
    try:
        print(write_paper_tables(args.logs, args.out))
    except (ConfigError, FileNotFoundError) as err:
        print(f"analysis.tables: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
