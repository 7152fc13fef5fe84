"""analysis.stability (Spearman, snapshot stability, AUROC vs hard) and analysis.compare (per-class Δ, pairing)."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis.compare import pair_class_delta, pair_runs, per_class_delta
from analysis.stability import average_ranks, snapshot_stability, spearman
from hlbench.errors import BadFileError


def _write_maps(run_dir, it, hl, loss, label, hard):
    (run_dir / "hl_maps").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(run_dir / "hl_maps" / f"maps_{it:06d}.npz", hl=np.asarray(hl, np.float16),
                        loss=np.asarray(loss, np.float16), label=np.asarray(label, np.uint8),
                        hard=np.asarray(hard, np.uint8))


def test_average_ranks_share_ties():
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_spearman_identical_reversed_ties_and_constant():
    x = np.array([0.1, 0.5, 0.2, 0.9, 0.3])
    assert spearman(x, x) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, x ** 3 + 7) == pytest.approx(1.0)  # ranks only: any increasing transform is 1
    # Ties: ranks a=[1,2,3,4], b=[1.5,1.5,3.5,3.5] -> Pearson of the ranks = 0.8944 (hand-computed)
    assert spearman(np.array([1, 2, 3, 4]), np.array([0, 0, 1, 1])) == pytest.approx(2 / math.sqrt(5))
    assert math.isnan(spearman(x, np.ones_like(x)))
    with pytest.raises(ValueError, match="differ in size"):
        spearman(x, x[:3])


def test_snapshot_stability_rows_and_values(tmp_path):
    rng = np.random.default_rng(0)
    k, h, w = 2, 6, 8
    label = rng.integers(0, 3, (k, h, w))
    label[:, 0, :] = 255  # an ignored row, with loss 0 as the trainer writes it
    hard = (rng.random((k, h, w)) < 0.3).astype(np.uint8)
    hl = rng.random((k, h, w)) + 2 * hard  # hard pixels score higher, but not perfectly
    loss = rng.random((k, h, w))
    loss[label == 255] = 0
    _write_maps(tmp_path, 10, hl, loss, label, hard)
    _write_maps(tmp_path, 20, hl, loss, label, hard)  # identical snapshot
    rev_loss = np.where(label == 255, 0, 1 - loss)  # reversed loss ranks on labelled pixels
    _write_maps(tmp_path, 30, hl[:, None], rev_loss, label, hard)  # hl with a channel axis, as K×1×H×W
    df = snapshot_stability(tmp_path)
    assert df["iter"].tolist() == [20, 30] and df["prev_iter"].tolist() == [10, 20]
    assert df["hl_rank_corr"].tolist() == pytest.approx([1.0, 1.0])
    assert df["loss_rank_corr"].tolist() == pytest.approx([1.0, -1.0], abs=1e-3)  # float16 rounding ties
    assert 0.9 < df["hl_auroc_vs_hard"].iloc[0] <= 1.0
    assert 0.3 < df["loss_auroc_vs_hard"].iloc[0] < 0.7  # random loss carries no hardness signal
    # ignored pixels are excluded: also marking them hard leaves the AUROC unchanged
    hard2 = hard.copy()
    hard2[label == 255] = 1
    _write_maps(tmp_path, 40, hl, rev_loss, label, hard2)
    assert snapshot_stability(tmp_path)["hl_auroc_vs_hard"].iloc[2] == pytest.approx(df["hl_auroc_vs_hard"].iloc[1])


def test_snapshot_stability_empty_and_mismatched(tmp_path):
    assert snapshot_stability(tmp_path).empty and "hl_rank_corr" in snapshot_stability(tmp_path).columns
    ones = np.ones((1, 2, 2))
    _write_maps(tmp_path, 1, ones, ones, ones, ones)
    assert snapshot_stability(tmp_path).empty  # one snapshot: no pair
    _write_maps(tmp_path, 2, ones, ones, 2 * ones, ones)
    with pytest.raises(BadFileError, match="not the same images"):
        snapshot_stability(tmp_path)


def _summary(iou, hl):
    return {"final": {"mIoU": float(np.nanmean([v for v in iou.values() if v is not None])), "IoU": iou},
            "hl": hl}


def test_per_class_delta_sorted_in_points():
    base = _summary({"road": 0.9, "pole": 0.30, "bus": None}, False)
    hl = _summary({"road": 0.89, "pole": 0.35, "bus": 0.5}, True)
    df = per_class_delta(base, hl)
    assert df.columns.tolist() == ["class", "base IoU", "HL IoU", "Δ"]
    assert df["class"].tolist() == ["pole", "road", "bus"]  # NaN Δ last
    assert df["Δ"].iloc[0] == pytest.approx(5.0) and df["Δ"].iloc[1] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="class sets differ"):
        per_class_delta(base, _summary({"road": 0.9}, True))
    with pytest.raises(KeyError, match="best.IoU"):
        per_class_delta(base, hl, entry="best")


def test_pair_runs_by_seed_and_class_delta_summary(tmp_path):
    rows = []
    for exp, hl, seed, pole in [("b", False, 0, 0.2), ("h", True, 0, 0.3), ("b", False, 1, 0.2),
                                ("h", True, 1, 0.1), ("h", True, 2, 0.5)]:
        run_dir = tmp_path / f"{exp}{seed}"
        run_dir.mkdir()
        (run_dir / "summary.json").write_text(json.dumps(_summary({"pole": pole, "road": 0.9}, hl)))
        rows.append({"run_dir": str(run_dir), "experiment": exp, "suite": "s", "seed": seed, "method.name": "supervised",
                     "model.name": "m", "hl.enabled": hl, "data.name": "d", "data.split": None})
    pairs = pair_runs(pd.DataFrame(rows))
    assert pairs["seed"].tolist() == [0, 1]  # seed 2 has no baseline
    assert pairs["run_dir_hl"].iloc[0].endswith("h0") and pairs["run_dir_base"].iloc[1].endswith("b1")
    assert pair_runs(pd.DataFrame(rows), suite="other").empty
    table = pair_class_delta(pairs).set_index("class")
    assert table.loc["pole", "mean Δ"] == pytest.approx(0.0) and table.loc["pole", "improved"] == "1/2"
    assert table.loc["road", "mean base IoU"] == pytest.approx(90.0)
    assert pair_class_delta(pair_runs(pd.DataFrame())).empty


def test_pairs_never_cross_methods_or_splits():
    row = {"suite": "semisup", "seed": 0, "model.name": "m", "data.name": "cityscapes_semisup"}
    rows = [{**row, "experiment": "unimatch_1_8", "method.name": "unimatch", "hl.enabled": False,
             "data.split": "unimatch/1_8", "run_dir": "a"},
            {**row, "experiment": "u2pl_hl_1_8", "method.name": "u2pl", "hl.enabled": True,
             "data.split": "u2pl/1_8", "run_dir": "b"},
            {**row, "experiment": "u2pl_1_4", "method.name": "u2pl", "hl.enabled": False,
             "data.split": "u2pl/1_4", "run_dir": "c"},
            {**row, "experiment": "u2pl_1_8", "method.name": "u2pl", "hl.enabled": False,
             "data.split": "u2pl/1_8", "run_dir": "d"}]
    pairs = pair_runs(pd.DataFrame(rows))
    assert pairs[["experiment_base", "experiment_hl"]].values.tolist() == [["u2pl_1_8", "u2pl_hl_1_8"]]
