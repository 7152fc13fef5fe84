"""analysis.hl_study: top-fraction overlap, stability curves vs the final snapshot, per-kind AUROC, strata."""
import math

import numpy as np
import pytest
import torch

from analysis.hl_study import (_Stratum, main, readable, stability_curves, stability_summary, stratum_miou,
                               study_tables, top_overlap)
from hlbench.labels import IGNORE_INDEX
from tests.conftest import TINY, compose_run

BITS = {"thin": 1, "small": 2}


def _write(run_dir, it, hl, loss, label, hard):
    (run_dir / "hl_maps").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(run_dir / "hl_maps" / f"maps_{it:06d}.npz", hl=np.asarray(hl, np.float16),
                        loss=np.asarray(loss, np.float16), label=np.asarray(label, np.uint8),
                        hard=np.asarray(hard, np.uint8), kinds=np.array(list(BITS), dtype=str),
                        bits=np.array(list(BITS.values()), np.int64))


def test_top_overlap_counts_shared_top_entries():
    a = np.array([9.0, 8, 7, 1, 0, 2, 3, 4, 5, 6])
    assert top_overlap(a, a, 0.3) == 1.0
    assert top_overlap(a, -a, 0.3) == 0.0
    b = a.copy()
    b[2] = -1  # 7 leaves b's top 3, 6 enters: 2 of 3 shared
    assert top_overlap(a, b, 0.3) == pytest.approx(2 / 3)


def test_curves_separate_a_steady_hl_map_from_a_fading_loss(tmp_path):
    rng = np.random.default_rng(0)
    k, h, w = 2, 8, 8
    label = rng.integers(0, 3, (k, h, w))
    label[:, 0] = IGNORE_INDEX
    hard = np.zeros((k, h, w), np.uint8)
    hard[:, 2:4] = BITS["thin"]
    hard[:, 5] = BITS["small"]
    hl = rng.random((k, h, w)) + 3.0 * (hard > 0)  # ranks hard pixels first at every snapshot
    for i, it in enumerate((100, 200, 300)):
        # the loss marks the hard pixels early, then fades there as they are fitted, and is noise at the end
        loss = rng.random((k, h, w)) + (2.0 - i) * 3.0 * (hard > 0)
        _write(tmp_path, it, hl, loss, label, hard)
    df = stability_curves(tmp_path, top=0.2)
    assert df["iter"].tolist() == [100, 100, 200, 200, 300, 300] and set(df["signal"]) == {"hl", "loss"}
    hl_rows, loss_rows = df[df.signal == "hl"], df[df.signal == "loss"]
    assert hl_rows["corr_final"].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert np.isnan(hl_rows["corr_prev"].iloc[0]) and hl_rows["corr_prev"].iloc[1:].tolist() == pytest.approx([1, 1])
    assert loss_rows["corr_final"].iloc[0] < 0.5 and loss_rows["top_final"].iloc[0] < 0.5
    assert hl_rows["auroc.thin"].tolist() == pytest.approx([1.0] * 3)
    assert hl_rows["auroc.hard"].tolist() == pytest.approx([1.0] * 3)  # hard = thin | small by default
    assert loss_rows["auroc.small"].iloc[0] == pytest.approx(1.0) and 0.2 < loss_rows["auroc.small"].iloc[2] < 0.8
    summary = stability_summary([tmp_path], top=0.2)
    assert summary["signal"].tolist() == ["hl", "loss"]
    assert summary.loc[summary.signal == "hl", "corr_final"].iloc[0].startswith("1.000 (1)")


def test_curves_empty_for_a_run_without_two_snapshots(tmp_path):
    assert stability_curves(tmp_path).empty
    assert stability_summary([tmp_path]).empty


class _Items:
    classes = ["a", "b"]

    def __init__(self):
        self.sample = {"img": np.zeros((2, 2, 3), np.uint8), "label": np.array([[0, 1], [1, IGNORE_INDEX]], np.uint8),
                       "hard": np.array([[0, 1], [3, 2]], np.uint8), "index": 0}

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return self.sample


def test_printed_columns_are_named_in_words():
    assert [readable(c) for c in ("final.mIoU", "report_IoU", "hl_auroc", "stratum.none.mIoU", "stratum.thin.acc",
                                  "corr_prev", "top_final", "auroc.small", "row")] == [
        "mIoU", "thin/small IoU", "HL AUROC", "no kind mIoU", "thin acc", "corr. prev", "top 10 % final",
        "AUROC small", "row"]
    assert readable("top_prev", top=0.05) == "top 5 % prev"


def test_stratum_keeps_only_its_pixels():
    items = _Items()
    assert _Stratum(items, None)[0]["label"].tolist() == [[0, 255], [255, 255]]  # no kind
    assert _Stratum(items, 1)[0]["label"].tolist() == [[255, 1], [1, 255]]  # thin bit, alone or with small
    assert items.sample["label"].tolist() == [[0, 1], [1, 255]]  # the wrapped data set's sample is not modified


def test_stratum_miou_skips_classes_without_truth_in_the_stratum():
    confusion = torch.tensor([[10, 0, 1],   # truth 0: 10 right, 1 predicted as class 2
                              [0, 5, 0],
                              [0, 0, 0]])   # class 2 has no pixel in this stratum, only the stray prediction
    assert stratum_miou(confusion) == pytest.approx((10 / 11 + 1.0) / 2)
    assert math.isnan(stratum_miou(torch.zeros(3, 3)))


@pytest.mark.slow
def test_study_tables_from_real_runs(hydra_ctx, tmp_path, capsys):
    from hlbench.run import run

    cfg, choices, overrides = compose_run(TINY + ["suite=smoke"], tmp_path)
    run(cfg, choices, overrides)
    tables = study_tables(tmp_path / "smoke")
    assert tables["accuracy"]["row"].tolist() == ["HL", "baseline"]
    assert tables["classes"].columns.tolist() == ["row", *cfg.data.report_classes]  # the data config's thin/small
    strata = [f"stratum.{s}.{m}" for m in ("mIoU", "acc") for s in ("none", "thin", "small", "boundary", "confusable")]
    assert tables["strata"].columns.tolist() == ["row", *strata]
    assert tables["accuracy"].loc[tables["accuracy"]["row"] == "baseline", "hl_auroc"].item() == "–"
    runs = tables["runs"]
    assert ((runs.filter(like="stratum.").to_numpy() >= 0) & (runs.filter(like="stratum.").to_numpy() <= 1)).all()
    assert tables["stability"]["signal"].tolist() == ["hl", "loss"]  # from the HL run's two snapshots
    capsys.readouterr()  # the runner's own table
    main([str(tmp_path / "smoke")])
    printed = capsys.readouterr().out
    assert "no kind mIoU" in printed and "HL AUROC" in printed and "stratum." not in printed and "±" not in printed
