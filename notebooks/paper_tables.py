# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Paper tables: ours from our runs, the authors' from their logs
#
# * **Ours.** Each suite is one paper table (`experiments/suites/<suite>.yaml`): the table the run printed,
#   each paper table in the paper's shape (the suite's cells: rows × columns, ours beside the paper's number,
#   once with the final and once with the best evaluation), final and best mIoU side by side (mean ± std (n)
#   over seeds, points), and baseline vs HL per suite.
# * **The authors'.** Given a folder laid out like the authors' `logs/` (one sub-folder per table, each with a
#   README whose cells link to log files), every table rebuilt from the logs with its check column
#   (`analysis.authors_tables`, also `python -m analysis.authors_tables <dir> --out DIR`).
#
# Set `HLBENCH_RUNS` to the runs folder (default: the project's `outputs/`) and `HLBENCH_LOGS` to the authors'
# logs folder.

# %% tags=["parameters"]
import os

RUNS = os.environ.get("HLBENCH_RUNS")  # None: <project>/outputs; a relative path: analysis.runs.runs_folder
LOGS = os.environ.get("HLBENCH_LOGS", "")

# %%
# %matplotlib inline
from pathlib import Path

import pandas as pd
import seaborn as sns

from analysis import aggregate, format_mean_std, format_table
from analysis.runs import notebook_runs
from analysis.semisup import read_summaries
from analysis.suite_tables import profiles, suite_table
from hlbench.suites import load_suite
from hlbench.report import comparison_table

RUNS, runs = notebook_runs(RUNS)
summaries = read_summaries(RUNS) if RUNS.is_dir() else []
suites = sorted({s["suite"] for s in summaries if s.get("suite")})
print(f"{len(runs)} run(s) in {len(suites)} suite(s): {', '.join(suites) or '-'}")

# %% [markdown]
# ## Each suite's table as the runner printed it (final iteration; the paper's number where the card has one)
#
# One table per suite and profile: a profile's dry runs (`profile=smoke` trains a small stand-in model) are not the
# recipe's runs, and their tables print "smoke model" where the paper's number would be.

# %%
if not suites:
    print("no suite runs: no tables")
for suite in suites:
    for profile in dict.fromkeys(s.get("profile") for s in summaries if s.get("suite") == suite):
        made = [s for s in summaries if s.get("suite") == suite and s.get("profile") == profile]
        print(comparison_table(made, title=suite + (f", profile={profile}" if profile else "")))
        print()

# %% [markdown]
# ## Each paper table in the paper's shape: ours (mean ± std (n)); the paper's number

# %%
paper_suites = [s for s in suites if load_suite(s).get("cells")]
if not paper_suites:
    print("none of these suites is a paper table (a suite file with cells): no paper-shaped table")
for suite in paper_suites:
    for profile in profiles(runs[runs["suite"] == suite]):
        for shows in ("final", "best"):
            table = suite_table(runs, suite, shows, profile)
            print(table.attrs["title"])
            print(format_table(table.reset_index()))
            print()

# %% [markdown]
# ## Final and best mIoU, mean ± std (n) over seeds (points)

# %%
metrics = [m for m in ("final.mIoU", "best.mIoU") if m in runs.columns]
if runs.empty:
    print("no runs: no final / best table")
else:
    by = ["suite", "experiment", *(["profile"] if "profile" in runs.columns else []), "hl.enabled"]
    print(format_table(format_mean_std(aggregate(runs, by=by, metrics=metrics))))

# %% [markdown]
# ## Baseline vs HL per suite (final mIoU, bars: mean over seeds, whiskers: sd)

# %%
if runs.empty:
    print("no runs: no chart")
else:
    plot = runs.assign(mIoU=100 * pd.to_numeric(runs["final.mIoU"], errors="coerce"),
                       HL=runs["hl.enabled"].map({True: "HL", False: "baseline"}))
    grid = sns.catplot(data=plot, kind="bar", y="experiment", x="mIoU", hue="HL", col="suite", errorbar="sd",
                       sharey=False, height=0.4 * plot["experiment"].nunique() + 1.5, aspect=1.5)

# %% [markdown]
# ## The authors' tables, rebuilt from their logs (`analysis.authors_tables`)
#
# Each table in its README's shape with Δ = HL − baseline, the mean Δ line and a check column flagging any cell
# whose README number differs from the value rebuilt from its log.

# %%
if not LOGS or not Path(LOGS).is_dir():
    print("HLBENCH_LOGS is not a folder: set it to a folder laid out like the authors' logs/ to rebuild their tables")
else:
    from analysis.authors_tables import build_paper_tables

    tables, skipped, _ = build_paper_tables(LOGS)
    for t in tables:
        print(f"{t.name}: {len(t.failures)} cell(s) failing the check")
        print(t.markdown)
    print(*skipped, sep="\n")
