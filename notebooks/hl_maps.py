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
# # HL maps: where the learned hardness looks, and at which pixels
#
# Each HL run stores, every `train.hl_map_interval` iterations, the HL map, the per-pixel CE loss and the
# ground-truth hardness mask (synthetic data) of the same fixed val images (`hl_maps/maps_<iter>.npz`). This
# notebook draws the last snapshot of each HL run and tabulates the mean hardness per class and per hardness kind.
# Set `HLBENCH_RUNS` to the runs folder (default: the project's `outputs/`).

# %% tags=["parameters"]
import os

RUNS = os.environ.get("HLBENCH_RUNS")  # None: <project>/outputs; a relative path: analysis.runs.runs_folder
MAX_RUNS = 4  # panels drawn (one per HL run)

# %%
# %matplotlib inline
import pandas as pd
import seaborn as sns
from IPython.display import display

from analysis import format_table
from analysis.hl_maps import class_hardness, kind_hardness, snapshot_figure
from analysis.runs import notebook_runs
from hlbench.tracking.snapshots import snapshot_paths

RUNS, runs = notebook_runs(RUNS)
hl_runs = runs[runs["hl.enabled"].fillna(False).astype(bool)]
hl_runs = hl_runs[hl_runs["run_dir"].map(lambda d: bool(snapshot_paths(d))).astype(bool)]
print(f"{len(runs)} run(s), {len(hl_runs)} HL run(s) with HL-map snapshots")

# %% [markdown]
# ## Last snapshot of each HL run
#
# image | ground truth | prediction | HL map | CE loss | hardness kinds. The HL and loss columns share one colour
# scale over their rows (colour bars below). Hardness kinds are drawn rarest on top, so the thin and small
# pixels stay visible over the large confusable regions; the legend gives each kind's share of the pixels.

# %%
if hl_runs.empty:
    print("no HL run with snapshots: no panels")
for r in hl_runs.head(MAX_RUNS).itertuples():
    display(snapshot_figure(r.run_dir, title=f"{r.experiment} seed {r.seed}"))

# %% [markdown]
# ## Mean hardness per class (last snapshot, labelled pixels of the fixed val images), mean over seeds

# %%
per_class = [class_hardness(r.run_dir).assign(experiment=r.experiment, seed=r.seed) for r in hl_runs.itertuples()]
if not per_class:
    print("no HL run with snapshots: no per-class hardness")
else:
    per_class = pd.concat(per_class, ignore_index=True)
    by_class = (per_class.groupby(["experiment", "class"], sort=False)[["mean HL", "mean CE loss"]].mean()
                .reset_index().sort_values(["experiment", "mean HL"], ascending=[True, False]))
    print(format_table(by_class, digits=3))
    grid = sns.catplot(data=by_class, kind="bar", y="class", x="mean HL", col="experiment", color="tab:purple",
                       height=0.28 * by_class["class"].nunique() + 1.5, aspect=1.4, sharex=False)
    grid.set_titles("{col_name}: mean HL per class")

# %% [markdown]
# ## Mean hardness per hardness kind vs pixels of no kind
#
# A hardness map that marks the hard pixels scores them above "none"; kinds overlap, so shares need not sum to 1.

# %%
per_kind = [kind_hardness(r.run_dir).assign(experiment=r.experiment, seed=r.seed) for r in hl_runs.itertuples()]
per_kind = pd.concat(per_kind, ignore_index=True) if per_kind else pd.DataFrame()
if per_kind.empty:
    print("no snapshot names its hardness kinds: no per-kind hardness")
else:
    by_kind = per_kind.groupby(["experiment", "kind"], sort=False)[["share", "mean HL", "mean CE loss"]].mean()
    print(format_table(by_kind.reset_index(), digits=3))
    long = by_kind.reset_index().melt(id_vars=["experiment", "kind"], value_vars=["mean HL", "mean CE loss"],
                                      var_name="map", value_name="mean")
    grid = sns.catplot(data=long, kind="bar", x="kind", y="mean", hue="experiment", col="map", sharey=False,
                       height=3, aspect=1.3)
