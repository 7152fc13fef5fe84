"""What every results table shares, so that the runner's console tables (hlbench.report) and the analysis's tables
and notebooks (analysis.tables, suite_tables, semisup) say the same thing the same way: "mean ± std (n)" over
seeds, the semi-supervised references' selection rule, and fixed-width text and Markdown rendering."""
from __future__ import annotations

import math

import numpy as np

# mIoU and IoU in points (x100) with two decimals, as mmseg's and the HL paper's tables print them.
POINTS, POINT_DIGITS = 100.0, 2
# The rule's keys in a run's summary, flattened as analysis.runs.load_runs names its columns.
REFERENCE_RULE_KEYS = ("best.rescored.mIoU", "best.mIoU")


def mean_std_text(mean: float, std: float, n: int, scale: float = 1.0, digits: int = POINT_DIGITS) -> str:
    """"62.00 ± 2.83 (2)"; one sample has no spread: "70.00 (1)"; no sample: "–"."""
    if n == 0:
        return "–"
    if n == 1 or math.isnan(std):
        return f"{mean * scale:.{digits}f} ({n})"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f} ({n})"


def mean_std(values, scale: float = 1.0, digits: int = POINT_DIGITS) -> str:
    """mean_std_text of the values that are numbers (None and NaN left out); the std is the sample std."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "–"
    return mean_std_text(float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan,
                         len(vals), scale, digits)


def reference_rule_miou(summary: dict) -> float | None:
    """The number a reference reports: its selected weights scored with the final protocol where another protocol
    selected them (U2PL's eval.py on ckpt_best), else the selected evaluation itself (UniMatch's best)."""
    best = summary.get("best") or {}
    return (best.get("rescored") or best).get("mIoU")


def text_table(rows: list[list[str]]) -> list[str]:
    """Fixed-width lines of rows (the first is the header), a dashed rule under the header."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*rows[0]), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows[1:]]


def markdown_table(rows: list[list[str]]) -> str:
    """A fixed-width Markdown pipe table of rows (the first is the header); a "|" inside a cell is escaped, so
    every cell stays one Markdown cell."""
    rows = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
