"""The HL-stability study: is the learned HL map a steadier hardness signal than the per-pixel loss?

The paper argues (Fig. 1, no number) that a hard region's CE loss fades as the network fits it, while the HL map
keeps marking it. On the K fixed val images whose maps a run stores every `train.hl_map_interval` iterations
(hl_maps/maps_<iter>.npz), this module measures both signals side by side at every snapshot:
- rank correlation (Spearman, per image over labelled pixels) with the previous and with the final snapshot;
- overlap of the hardest `top` fraction of pixels with the previous and the final snapshot (|A ∩ B| / |A|);
- AUROC against the synthetic scenes' ground-truth hardness mask, per kind and for "hard" (any data.hard_kinds).
and, from a run's final weights on the whole val set, mIoU within each stratum of true hardness (pixels of no
kind = the easiest, then each kind; pixel accuracy and mIoU), so "does HL help the hard pixels" is a number per stratum.
`suite=hl_study` makes the runs; `python -m analysis.hl_study <runs folder>` prints the tables.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.runs import load_runs, repeats_note
from analysis.stability import spearman
from analysis.tables import aggregate, format_mean_std
from hlbench.errors import BadFileError, ConfigError, MissingInputError
from hlbench.labels import IGNORE_INDEX
from hlbench.metrics import binary_auroc
from hlbench.tracking.snapshots import kind_bits, load_snapshot, snapshot_paths

SIGNALS = ("hl", "loss")
# The printed tables' column names for summary.json keys and this module's own.
LABELS = {"final.mIoU": "mIoU", "report_IoU": "thin/small IoU", "hl_auroc": "HL AUROC", "none": "no kind",
          "corr_prev": "corr. prev", "corr_final": "corr. final"}


def readable(column: str, top: float = 0.10) -> str:
    """A table column's printed name: "stratum.none.mIoU" -> "no kind mIoU", "top_final" -> "top 10 % final",
    "auroc.thin" -> "AUROC thin"; other names unchanged."""
    if column in LABELS:
        return LABELS[column]
    if column.startswith("stratum."):
        stratum, metric = column[len("stratum."):].rsplit(".", 1)
        return f"{LABELS.get(stratum, stratum)} {metric}"
    if column.startswith("top_"):
        return f"top {100 * top:g} % {column[len('top_'):]}"
    if column.startswith("auroc."):
        return f"AUROC {column[len('auroc.'):]}"
    return column


def top_overlap(a: np.ndarray, b: np.ndarray, top: float) -> float:
    """Fraction of the `top` highest-scoring entries of `a` that are also among the `top` highest of `b`."""
    a, b = np.ravel(a), np.ravel(b)
    k = max(1, int(round(top * a.size)))
    pick_a = np.argpartition(-a, k - 1)[:k]
    pick_b = np.argpartition(-b, k - 1)[:k]
    return float(np.intersect1d(pick_a, pick_b).size / k)


def _per_image(fn, x: np.ndarray, y: np.ndarray, valid: np.ndarray) -> float:
    values = [fn(a[v], b[v]) for a, b, v in zip(x, y, valid) if v.any()]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _aurocs(score: np.ndarray, hard: np.ndarray, valid: np.ndarray, bits: dict, hard_kinds) -> dict:
    """AUROC of `score` for each kind's pixels, and for "hard" (any of hard_kinds), vs pixels of no kind."""
    s, h = torch.from_numpy(score[valid]), torch.from_numpy(hard[valid].astype(np.int64))
    easy = h == 0
    out = {}
    groups = {kind: bit for kind, bit in bits.items()}
    if hard_kinds:
        groups["hard"] = sum(bits[k] for k in hard_kinds)
    for name, mask in groups.items():
        pos = (h & mask) > 0
        keep = pos | easy
        out[name] = binary_auroc(s[keep], pos[keep]) if pos.any() and easy.any() else float("nan")
    return out


def stability_curves(run_dir, top: float = 0.10, hard_kinds=None, ignore_index: int = IGNORE_INDEX) -> pd.DataFrame:
    """One row per snapshot and signal (hl, loss): corr_prev, corr_final, top_prev, top_final, auroc.<kind>.

    Rows of the first snapshot have NaN *_prev values. Empty when the run stored fewer than two snapshots with HL
    maps (a baseline run stores none).
    """
    paths = snapshot_paths(run_dir)
    if len(paths) < 2:
        return pd.DataFrame(columns=["iter", "signal", "corr_prev", "corr_final", "top_prev", "top_final"])
    final = load_snapshot(paths[-1][1])
    bits = kind_bits(final)
    if hard_kinds is None:
        hard_kinds = [k for k in bits if k != "confusable"]
    rows, prev = [], None
    for it, path in paths:
        cur = load_snapshot(path)
        if not np.array_equal(cur["label"], final["label"]):
            raise BadFileError(f"{path}: not the same images as the final snapshot {paths[-1][1].name} (labels differ)")
        valid = cur["label"] != ignore_index
        for signal in SIGNALS:
            row = {"iter": it, "signal": signal,
                   "corr_prev": _per_image(spearman, prev[signal], cur[signal], valid) if prev else float("nan"),
                   "corr_final": _per_image(spearman, cur[signal], final[signal], valid),
                   "top_prev": (_per_image(lambda a, b: top_overlap(a, b, top), prev[signal], cur[signal], valid)
                                if prev else float("nan")),
                   "top_final": _per_image(lambda a, b: top_overlap(a, b, top), cur[signal], final[signal], valid)}
            row.update({f"auroc.{k}": v for k, v in _aurocs(cur[signal], cur["hard"], valid, bits,
                                                           hard_kinds).items()})
            rows.append(row)
        prev = cur
    return pd.DataFrame(rows)


def stability_summary(run_dirs, top: float = 0.10) -> pd.DataFrame:
    """Per signal, over runs: each metric averaged over a run's snapshots after the first, then mean ± std (n)
    over runs. The final snapshot is left out of the *_final columns (it equals itself)."""
    per_run = []
    for run_dir in run_dirs:
        curves = stability_curves(run_dir, top=top)
        if curves.empty:
            continue
        last = curves["iter"].max()
        later = curves[curves["iter"] > curves["iter"].min()]
        means = later.groupby("signal").mean(numeric_only=True)
        finals = later[later["iter"] < last].groupby("signal")[["corr_final", "top_final"]].mean()
        means[["corr_final", "top_final"]] = finals
        per_run.append(means.drop(columns="iter").reset_index().assign(run=str(run_dir)))
    if not per_run:
        return pd.DataFrame()
    df = pd.concat(per_run, ignore_index=True)
    metrics = [c for c in df.columns if c not in ("signal", "run")]
    return format_mean_std(aggregate(df, ["signal"], metrics), scale=1.0, digits=3)


class _Stratum(torch.utils.data.Dataset):
    """A val set whose labels keep only one stratum of true hardness (others -> ignore), for stratified mIoU."""

    def __init__(self, dataset, bits: int | None):
        self.dataset, self.bits = dataset, bits
        self.hard_bits = {}  # no AUROC inside a stratum: the mask is what selects the pixels
        self.classes = dataset.classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = dict(self.dataset[index])
        hard = torch.as_tensor(item["hard"])
        keep = hard == 0 if self.bits is None else (hard & self.bits) > 0
        item["label"] = torch.as_tensor(item["label"]).masked_fill(~keep, IGNORE_INDEX)
        return item


def stratified_scores(run_dir) -> dict[str, float]:
    """mIoU of a run's last checkpoint on the whole val set within each stratum of true
    hardness: "none" (pixels of no kind) and each kind of the data set's hardness mask, as {"<stratum>.mIoU",
    "<stratum>.acc"}. Classes absent from a stratum do not count in its mIoU (stratum_miou); acc is the fraction of
    the stratum's pixels classified right, the plainer number where a stratum holds few pixels of some class."""
    from omegaconf import OmegaConf

    from hlbench.data import build_datasets
    from hlbench.engine.checkpoint import latest_checkpoint
    from hlbench.engine.evaluator import evaluate, hardness_kinds
    from hlbench.models import trained_model

    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise MissingInputError(f"{run_dir / 'checkpoints'}: no iter_*.pth checkpoint to score")
    val_set = build_datasets(cfg.data, int(cfg.seed))["val"]
    bits = hardness_kinds(val_set)
    if not bits:
        raise ConfigError(f"{run_dir}: data set {cfg.data.name!r} has no ground-truth hardness mask")
    model, _ = trained_model(cfg, ckpt, len(val_set.classes))  # the run's own HL head
    device = torch.device("cpu")
    eval_cfg = OmegaConf.merge(cfg.eval, {"hl_auroc": False})
    out = {}
    for name, mask in [("none", None), *bits.items()]:
        result = evaluate(model, _Stratum(val_set, mask), eval_cfg, cfg.data, device, list(val_set.classes))
        out[f"{name}.mIoU"], out[f"{name}.acc"] = stratum_miou(result["confusion"]), result["metrics"]["aAcc"]
    return out


def stratum_miou(confusion: torch.Tensor) -> float:
    """Mean IoU over the classes with ground-truth pixels in the stratum (rows: truth, columns: prediction).

    Unlike the data set's mIoU, a class predicted in a stratum that holds none of its pixels does not count: there
    its IoU is 0 whatever the count, so a handful of stray pixels would swing the easy stratum's mIoU by a whole
    class's share (0.67 vs 1.00 at 99.99 % pixel accuracy on the synthetic scenes)."""
    mat = confusion.double()
    inter, gt_area = mat.diag(), mat.sum(1)
    present = gt_area > 0
    if not present.any():
        return float("nan")
    union = gt_area + mat.sum(0) - inter
    return float((inter[present] / union[present]).mean())


def study_tables(root, top: float = 0.10) -> dict[str, pd.DataFrame]:
    """The study's tables from a runs folder, each baseline vs HL as mean ± std (n) over seeds: "accuracy" (mIoU,
    thin/small IoU, HL AUROC), "classes" (final IoU of each of the data set's report classes, the thin and small
    ones), "strata" (mIoU and pixel accuracy per stratum of true hardness), "stability" (HL vs loss,
    stability_summary), and "runs" (one row per run counted, raw keys; its attrs["repeats"] the repeated runs of
    a seed left out: analysis.runs.repeats_note). main() prints them with readable() column names."""
    runs = load_runs(root)
    repeats = runs.attrs["repeats"]
    if runs.empty:
        raise MissingInputError(f"{root}: no run folders (summary.json) found")
    strata = pd.DataFrame([{f"stratum.{k}": v for k, v in stratified_scores(d).items()} for d in runs["run_dir"]])
    runs = pd.concat([runs.reset_index(drop=True), strata], axis=1)
    runs["row"] = np.where(runs["hl.enabled"].astype(bool), "HL", "baseline")
    report = list(dict.fromkeys(c for classes in runs["report_classes"].dropna() for c in classes))
    classes = [f"final.IoU.{c}" for c in report if f"final.IoU.{c}" in runs.columns]
    hl_dirs = [Path(d) for d, hl in zip(runs["run_dir"], runs["hl.enabled"]) if hl]
    runs.attrs["repeats"] = repeats
    strata_order = [c for metric in ("mIoU", "acc") for c in strata.columns if c.endswith(f".{metric}")]
    return {"accuracy": format_mean_std(aggregate(runs, ["row"], ["final.mIoU", "report_IoU", "hl_auroc"])),
            "classes": format_mean_std(aggregate(runs, ["row"], classes)).rename(columns=lambda c: c.split(".")[-1]),
            "strata": format_mean_std(aggregate(runs, ["row"], strata_order)),
            "stability": stability_summary(hl_dirs, top=top), "runs": runs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="runs folder, e.g. outputs/hl_study")
    parser.add_argument("--top", type=float, default=0.10, help="hardest fraction for the overlap (default 0.10)")
    parser.add_argument("--out", help="folder for one CSV per table (accuracy, classes, strata, stability, runs)")
    args = parser.parse_args(argv)
    tables = study_tables(args.root, top=args.top)
    if note := repeats_note(tables["runs"]):
        print(note + "\n")
    for name in ("accuracy", "classes", "strata", "stability"):
        print(f"## {name}\n{tables[name].rename(columns=lambda c: readable(c, args.top)).to_string(index=False)}\n")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, df in tables.items():
            df.to_csv(out / f"{name}.csv", index=False)
        print("outputs:", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
