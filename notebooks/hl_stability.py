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
# # HL stability: does the learned hardness stay put while the loss map fades?
#
# The paper's claim (Fig. 1): as the network fits a hard region its CE loss drops, so loss-based hardness forgets
# it, while the learned HL map keeps marking it. `analysis.hl_study` measures it on the fixed val images that
# each HL run snapshots, for the HL map and the CE loss side by side: rank correlation and overlap of the hardest
# 10 % of pixels with the previous and with the final snapshot, and (synthetic data) AUROC of each snapshot
# against the ground-truth hardness mask per kind. Set `HLBENCH_RUNS` to the runs folder
# (default: the project's `outputs/`).

# %% tags=["parameters"]
import os

RUNS = os.environ.get("HLBENCH_RUNS")  # None: <project>/outputs; a relative path: analysis.runs.runs_folder
MAX_RUNS = 2  # snapshot grids drawn (one per HL run)

# %%
# %matplotlib inline
import pandas as pd
import seaborn as sns
from IPython.display import display

from analysis import format_table
from analysis.hl_maps import snapshot_grid
from analysis.hl_study import stability_curves, stability_summary
from analysis.runs import notebook_runs
from hlbench.tracking.snapshots import snapshot_paths

RUNS, runs = notebook_runs(RUNS)
hl_runs = runs[runs["hl.enabled"].fillna(False).astype(bool)]
curves = [stability_curves(r.run_dir).assign(experiment=r.experiment, seed=r.seed) for r in hl_runs.itertuples()]
curves = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
snapshots = curves["iter"].nunique() if len(curves) else 0
print(f"{len(hl_runs)} HL run(s), {snapshots} snapshot iteration(s)")

# %% [markdown]
# ## Per signal: each measure averaged over a run's snapshots, mean ± std (n) over runs

# %%
summary = stability_summary(hl_runs["run_dir"])
print(format_table(summary) if not summary.empty else "no run with two or more snapshots: no stability numbers")

# %% [markdown]
# ## Curves: each measure for the HL map and for the CE loss, mean ± band over seeds

# %%
if curves.empty:
    print("no stability curves")
else:
    measures = [c for c in curves.columns if c not in ("iter", "signal", "experiment", "seed")]
    long = curves.melt(id_vars=["experiment", "seed", "iter", "signal"], value_vars=measures, var_name="measure")
    long["signal"] = long["signal"].map({"hl": "HL map", "loss": "CE loss"})
    grid = sns.relplot(data=long.dropna(subset=["value"]), kind="line", x="iter", y="value", hue="signal",
                       style="experiment", col="measure", col_wrap=3, marker="o", height=2.6, aspect=1.3,
                       facet_kws={"sharey": False})

# %% [markdown]
# ## Snapshot grid: one val image through training (rows HL map and CE loss, one colour scale per row)

# %%
with_pairs = hl_runs["run_dir"].map(lambda d: len(snapshot_paths(d)) >= 2).astype(bool)
grid_runs = hl_runs[with_pairs].head(MAX_RUNS)
if grid_runs.empty:
    print("no run with two or more snapshots: no snapshot grid")
for r in grid_runs.itertuples():
    display(snapshot_grid(r.run_dir, image=0))
