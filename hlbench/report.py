"""The comparison table printed at the end of a suite: one row per experiment, mean ± std (n) over seeds."""
from __future__ import annotations

import math

import numpy as np


def _mean_std(values: list[float | None], scale: float = 1.0, digits: int = 2) -> str:
    vals = [v * scale for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals, ddof=1):.{digits}f} ({len(vals)})"


def _card(paper: dict, key: str, digits: int) -> str:
    return f"{paper[key]:.{digits}f}" if paper.get(key) is not None else "–"


def comparison_table(summaries: list[dict], title: str = "") -> str:
    """Fixed-width text table: mIoU, IoU of the data set's thin/small classes, HL-map AUROC, time, paper."""
    rows: dict[str, list[dict]] = {}
    for s in summaries:
        rows.setdefault(s["experiment"], []).append(s)
    header = ["experiment", "HL", "mIoU", "thin/small IoU", "HL AUROC", "train s", "s/iter", "paper mIoU",
              "paper s/iter"]
    lines = []
    for name, runs in rows.items():
        paper = runs[0].get("paper") or {}
        lines.append([name, "yes" if runs[0]["hl"] else "no",
                      _mean_std([r["final"]["mIoU"] for r in runs], 100),
                      _mean_std([r.get("report_IoU") for r in runs], 100),
                      _mean_std([r.get("hl_auroc") for r in runs], 1, 3),
                      _mean_std([r["train_time_s"] for r in runs], 1, 0),
                      _mean_std([r.get("s_per_iter") for r in runs], 1, 3),
                      _card(paper, "value", 2), _card(paper, "s_per_iter", 3)])
    widths = [max(len(str(r[i])) for r in [header] + lines) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [title] if title else []
    out += [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in lines]
    classes = next((s.get("report_classes") for s in summaries if s.get("report_classes")), None)
    if classes:
        out.append(f"thin/small classes: {', '.join(classes)}; metrics are final-iteration values (x100), "
                   "mean ± std (n) over seeds")
    return "\n".join(out)
