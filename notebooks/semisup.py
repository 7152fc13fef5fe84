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
# # Semi-supervised runs: methods × label splits
#
# Rows are methods, columns label splits, as the paper's semi-supervised table (each experiment card's
# `paper.row` / `paper.column`; runs without a card use the experiment name and the split's source). Cells are
# mIoU in points, mean ± std (n) over seeds, once by the references' selection rule (their selected checkpoint,
# re-scored with the final protocol where another protocol selected it) and once at the last iteration.
# Set `HLBENCH_RUNS` to the runs folder (default: the project's `outputs/`).

# %% tags=["parameters"]
import os

RUNS = os.environ.get("HLBENCH_RUNS")  # None: <project>/outputs; a relative path: analysis.runs.runs_folder

# %%
# %matplotlib inline
import pandas as pd
import seaborn as sns

from analysis import format_table
from analysis.runs import notebook_runs
from analysis.semisup import RULES, methods_by_class, methods_by_split, read_summaries, semisup_runs
from hlbench.report import methods_by_split_table

RUNS, runs = notebook_runs(RUNS)
semi = semisup_runs(runs)
print(f"{len(runs)} run(s), {len(semi)} semi-supervised")

# %% [markdown]
# ## Method × split, both reporting rules

# %%
if semi.empty:
    print("no semi-supervised run (no split record in summary.json): no method × split table")
for rule in RULES if not semi.empty else []:
    print(f"mIoU x100, {rule}:")
    print(format_table(methods_by_split(runs, rule).reset_index()))

# %% [markdown]
# ## Ours beside the paper's numbers (the table `python -m hlbench.run suite=semisup` prints)

# %%
summaries = [s for s in read_summaries(RUNS) if s.get("split")] if RUNS.is_dir() else []
print(methods_by_split_table(summaries) if summaries else "no semi-supervised run: nothing to compare with the paper")

# %% [markdown]
# ## mIoU by split and method, last iteration (bars: mean over seeds, whiskers: sd)

# %%
if semi.empty:
    print("no semi-supervised run: no chart")
else:
    plot = semi.assign(mIoU=100 * pd.to_numeric(semi["final.mIoU"], errors="coerce"))
    grid = sns.catplot(data=plot, kind="bar", x="column", y="mIoU", hue="row", errorbar="sd", height=3.5, aspect=1.6)
    grid.set_axis_labels("split", "final mIoU (points)")

# %% [markdown]
# ## Where each method gains or loses: IoU per class, last iteration (mean over seeds, points), per split

# %%
for column in dict.fromkeys(semi["column"]) if not semi.empty else []:
    print(f"split {column}:")
    print(format_table(methods_by_class(runs, column).reset_index()))
