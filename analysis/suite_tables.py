"""Each suite's paper table from our runs, in the paper's shape.

The shape comes from the suite file (experiments/suites/<suite>.yaml): its cells say which experiment fills which
row × column and hold the paper's number. Each cell here is ours, mean ± std (n) over seeds in points, beside the
paper's: "79.8 ± 0.3 (3); paper 80.65". A table shows one evaluation, named in its columns' axis:
  final           the last iteration's (what the mmseg tables report);
  best            the best periodic evaluation's;
  reference rule  the semi-supervised references' selected checkpoint, re-scored where another protocol selected
                  it (hlbench.results_table.reference_rule_miou).
A table holds the runs of one profile (none: the recipe itself); where the profile replaced the model (smoke), the
cells say "smoke model" instead of the paper's number. The metric is mIoU, or the data set's own table metric where
its runs declare one (summary "metric": TotalText's fgIoU), as the paper's table reports it.
"""
from __future__ import annotations

import pandas as pd

from analysis.tables import aggregate, format_mean_std, reference_rule_column
from hlbench.report import SMOKE_MODEL, comparable_with_paper

SHOWS = {"final": "final.mIoU", "best": "best.mIoU", "reference rule": "reference_rule.mIoU"}


def profiles(runs: pd.DataFrame) -> list[str | None]:
    """The profiles of load_runs() rows (None: runs of the recipe itself), None first."""
    found = set(_column(runs, "profile").dropna())
    return ([None] if _column(runs, "profile").isna().any() else []) + sorted(found)


def _column(runs: pd.DataFrame, name: str) -> pd.Series:
    return runs[name] if name in runs.columns else pd.Series(None, index=runs.index, dtype=object)


def suite_table(runs: pd.DataFrame, suite: str, shows: str = "final", profile: str | None = None) -> pd.DataFrame:
    """Rows × columns of the suite's cells as "ours; paper X" strings: ours is empty where a cell has no run yet,
    the paper's "–" where it has no number. `runs` is analysis.load_runs() output; only runs of the suite's
    experiments made with `profile` (None: no profile) count."""
    from hlbench.suites import load_suite, suite_cards

    if shows not in SHOWS:
        raise KeyError(f"suite_table: shows={shows!r}; expected one of {list(SHOWS)}")
    spec = load_suite(suite)
    cards = suite_cards(spec)
    if not cards:
        raise KeyError(f"suite {suite!r} lists experiments but no cells: it is not a paper table")
    same_profile = _column(runs, "profile").isna() if profile is None else _column(runs, "profile") == profile
    runs = runs[runs["experiment"].isin(cards) & same_profile].copy()
    comparable = comparable_with_paper({"profile": profile})
    runs["reference_rule.mIoU"] = reference_rule_column(runs)
    declared = next(iter(_column(runs, "metric").dropna()), None) if shows != "reference rule" else None
    metric = f"{shows}.{declared}" if declared else SHOWS[shows]
    ours = {}
    if not runs.empty:
        cells = format_mean_std(aggregate(runs, by=["experiment"], metrics=[metric]))
        ours = dict(zip(cells["experiment"], cells[metric]))
    rows = list(dict.fromkeys(card["row"] for card in cards.values()))
    columns = list(spec.get("columns") or dict.fromkeys(card["column"] for card in cards.values()))
    table = pd.DataFrame("", index=pd.Index(rows, name="row"), columns=pd.Index(columns, name=shows))
    for experiment, card in cards.items():
        paper = "–" if card.get("value") is None else f"{card['value']:g}"
        table.loc[card["row"], card["column"]] = f"{ours.get(experiment, '')}; " + (f"paper {paper}" if comparable
                                                                                    else SMOKE_MODEL)
    made = f", profile={profile}" if profile else ""
    shown = f"{shows} {declared}" if declared else shows
    table.attrs["title"] = f"{spec.get('table', suite)} (ours{made}: {shown}, mean ± std (n); paper)"
    return table
