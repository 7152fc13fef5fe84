"""The comparison table printed at the end of a suite: one row per experiment, mean ± std (n) over seeds."""
from __future__ import annotations

from .results_table import POINT_DIGITS, POINTS, mean_std, reference_rule_miou, text_table


# profile=smoke trains the tiny model of the family in place of each experiment's model (hlbench/compose.py):
# the paper's numbers are no yardstick for its runs, so their tables say so instead of printing them.
MODEL_REPLACING_PROFILES = ("smoke",)
SMOKE_MODEL = "smoke model"


def comparable_with_paper(summary: dict) -> bool:
    """False for a run of a profile that replaced the experiment's model."""
    return summary.get("profile") not in MODEL_REPLACING_PROFILES


def _card(summary: dict, key: str, digits: int) -> str:
    """The paper's number `key` from the run's card, "–" without one, SMOKE_MODEL where it is not comparable."""
    if not comparable_with_paper(summary):
        return SMOKE_MODEL
    paper = summary.get("paper") or {}
    return f"{paper[key]:.{digits}f}" if paper.get(key) is not None else "–"


def comparison_table(summaries: list[dict], title: str = "") -> str:
    """Fixed-width text table: mIoU, the data set's own table metric where it declares one (TotalText's fgIoU, the
    paper's number then), IoU of the data set's thin/small classes, HL-map AUROC, time, paper."""
    rows: dict[str, list[dict]] = {}
    for s in summaries:
        rows.setdefault(s["experiment"], []).append(s)
    metric = next((s["metric"] for s in summaries if s.get("metric")), "mIoU")
    declared = [metric] if metric != "mIoU" else []
    header = ["experiment", "HL", "mIoU", *declared, "thin/small IoU", "HL AUROC", "train s", "s/iter",
              f"paper {metric}", "paper s/iter"]
    lines = []
    for name, runs in rows.items():
        lines.append([name, "yes" if runs[0]["hl"] else "no",
                      mean_std([r["final"]["mIoU"] for r in runs], POINTS),
                      *[mean_std([r["final"].get(m) for r in runs], POINTS) for m in declared],
                      mean_std([r.get("report_IoU") for r in runs], POINTS),
                      mean_std([r.get("hl_auroc") for r in runs], 1, 3),
                      mean_std([r["train_time_s"] for r in runs], 1, 0),
                      mean_std([r.get("s_per_iter") for r in runs], 1, 3),
                      _card(runs[0], "value", POINT_DIGITS), _card(runs[0], "s_per_iter", 3)])
    out = ([title] if title else []) + text_table([header] + lines)
    classes = next((s.get("report_classes") for s in summaries if s.get("report_classes")), None)
    if classes:
        out.append(f"thin/small classes: {', '.join(classes)}; metrics are final-iteration values (x100), "
                   "mean ± std (n) over seeds")
    return "\n".join(out)


def methods_by_split_table(summaries: list[dict], title: str = "") -> str:
    """The semi-supervised table as the paper lays it out: rows = methods, columns = splits (the cards' row and
    column), each cell ours (mean ± std (n) over seeds) beside the paper's; once by the references' selection
    rule and once at the last iteration."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for s in summaries:
        card = s.get("paper") or {}
        cells.setdefault((card.get("row", s["experiment"]), card.get("column", "")), []).append(s)
    rows = list(dict.fromkeys(r for r, _ in cells))
    cols = list(dict.fromkeys(c for _, c in cells))
    out = [title] if title else []
    for label, value in (("reference selection rule", reference_rule_miou),
                         ("last iteration", lambda s: s["final"]["mIoU"])):
        lines = [["method"] + [f"{c} ours (paper)" for c in cols]]
        for r in rows:
            line = [r]
            for c in cols:
                runs = cells.get((r, c))
                if not runs:
                    line.append("")
                    continue
                line.append(f"{mean_std([value(x) for x in runs], POINTS)} ({_card(runs[0], 'value', 1)})")
            lines.append(line)
        out += [f"mIoU x100, {label}:"] + text_table(lines)
    return "\n".join(out)
