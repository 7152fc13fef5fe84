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
# # HL analysis: baseline vs pixel-hardness learning
#
# Reads hlbench run folders (`python -m hlbench.run ...` writes them under `out_dir`, default the project's
# `outputs/`). Set `HLBENCH_RUNS` to another folder to analyse it. Every section prints a note instead of failing
# when the runs hold nothing for it (e.g. no HL run yet).

# %% tags=["parameters"]
import os

RUNS = os.environ.get("HLBENCH_RUNS")  # None: <project>/outputs; a relative path: analysis.runs.runs_folder

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D

from analysis import aggregate, format_mean_std, format_table, read_metrics
from analysis.compare import pair_class_delta, pair_runs
from analysis.runs import notebook_runs
from analysis.stability import snapshot_stability

RUNS, runs = notebook_runs(RUNS)
hl_runs = runs[runs["hl.enabled"].fillna(False).astype(bool)] if not runs.empty else runs
print(f"{len(runs)} run(s), {len(hl_runs)} with HL")

# %% [markdown]
# ## Runs: final mIoU, report-class IoU and HL AUROC, mean ± std (n seeds), in points

# %%
table_metrics = [m for m in ("final.mIoU", "report_IoU", "hl_auroc") if m in runs.columns]
if runs.empty:
    print("no runs: nothing to tabulate")
else:
    print(format_table(format_mean_std(aggregate(runs, by=["experiment"], metrics=table_metrics))))

# %% [markdown]
# ## Learning curves: train loss and val mIoU vs iteration

# %%
curves = [read_metrics(r.run_dir).assign(experiment=r.experiment, seed=r.seed)
          for r in runs[["run_dir", "experiment", "seed"]].itertuples()]
curves = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=["mode", "iter"])
train_curve = curves[curves["mode"] == "train"].dropna(subset=["loss"]) if "loss" in curves else curves.iloc[:0]
val_curve = curves[curves["mode"] == "val"].dropna(subset=["mIoU"]) if "mIoU" in curves else curves.iloc[:0]
if train_curve.empty and val_curve.empty:
    print("no train/val lines in metrics.jsonl: no learning curves")
else:
    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(12, 3.5), layout="constrained")
    # Seeds of one experiment are averaged into one line with a band (seaborn's default estimator). One colour per
    # experiment in both plots, named by one legend outside them, so no line hides behind it.
    colours = dict(zip(runs["experiment"].unique(), sns.color_palette(n_colors=runs["experiment"].nunique())))
    if not train_curve.empty:
        sns.lineplot(data=train_curve, x="iter", y="loss", hue="experiment", palette=colours, legend=False, ax=ax_loss)
    ax_loss.set_title("train loss")
    if not val_curve.empty:
        sns.lineplot(data=val_curve, x="iter", y="mIoU", hue="experiment", palette=colours, marker="o", legend=False,
                     ax=ax_miou)
    ax_miou.set_title("val mIoU")
    fig.legend(handles=[Line2D([], [], color=c, label=e) for e, c in colours.items()], title="experiment",
               loc="outside right upper", fontsize=8)
    plt.show()

# %% [markdown]
# ## Latest HL-map panel of each HL run

# %%
panels = [(r.experiment, r.seed, sorted(Path(r.run_dir).glob("hl_maps/iter_*.png")))
          for r in hl_runs[["run_dir", "experiment", "seed"]].itertuples()]
panels = [(exp, seed, pngs[-1]) for exp, seed, pngs in panels if pngs]
if not panels:
    print("no HL-map panels (no HL run, or train.hl_map_interval never reached)")
for exp, seed, png in panels:
    img = plt.imread(png)
    fig, ax = plt.subplots(figsize=(8, 8 * img.shape[0] / img.shape[1] + 0.4))  # panel's own aspect, legible
    ax.imshow(img)
    ax.set_title(f"{exp} seed {seed}: {png.name}")
    ax.axis("off")
    plt.show()

# %% [markdown]
# ## HL stability during training
#
# Spearman rank correlation between consecutive snapshots of the same fixed val images (a project-defined
# diagnostic; the paper only shows Fig. 1). The paper's claim: the learned HL map stays put while loss-based
# hardness decays as the network fits the pixels, so `hl_rank_corr` should stay high above `loss_rank_corr`.

# %%
stability = [snapshot_stability(r.run_dir).assign(experiment=r.experiment, seed=r.seed)
             for r in hl_runs[["run_dir", "experiment", "seed"]].itertuples()]
stability = pd.concat(stability, ignore_index=True) if stability else pd.DataFrame()
if stability.empty:
    print("no pairs of HL-map snapshots (hl_maps/maps_*.npz): no stability plot")
else:
    print(format_table(stability.drop(columns=["seed"]), digits=3))
    long = stability.melt(id_vars=["iter", "experiment"], value_vars=["hl_rank_corr", "loss_rank_corr"],
                          var_name="map", value_name="rank corr. with previous snapshot")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    sns.lineplot(data=long, x="iter", y="rank corr. with previous snapshot", hue="map", style="experiment",
                 marker="o", ax=ax)
    ax.set_ylim(-1.05, 1.05)
    plt.tight_layout()
    plt.show()

# %% [markdown]
# ## Per-class IoU Δ (HL − baseline), baseline and HL runs paired by seed

# %%
pairs = pair_runs(runs)
if pairs.empty:
    print("no baseline/HL pair with the same suite, model, data and seed: no per-class Δ")
else:
    delta = pair_class_delta(pairs)
    print(f"{len(pairs)} pair(s); IoU in points")
    print(format_table(delta))
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(delta) + 1))
    sns.barplot(data=delta, y="class", x="mean Δ", color="tab:blue", ax=ax)
    ax.axvline(0, color="black", linewidth=0.8)
    plt.tight_layout()
    plt.show()
