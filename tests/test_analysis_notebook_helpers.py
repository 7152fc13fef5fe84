"""analysis/hl_maps.py (pictures, hardness tables from HL-map snapshots) and analysis/semisup.py (method × split)."""
import json

import numpy as np
import pandas as pd
import pytest

from analysis.hl_maps import class_hardness, kind_hardness, snapshot_at, snapshot_figure, snapshot_grid
from analysis.semisup import methods_by_class, methods_by_split, semisup_runs
from hlbench.tracking.snapshots import save_snapshot

CLASSES = ["road", "pole"]
BITS = {"thin": 1, "confusable": 8}


def _scene(h=6, w=8):
    """Left half road (confusable), right half pole (thin); top row ignored."""
    label = np.zeros((1, h, w), np.uint8)
    label[:, :, w // 2:] = 1
    label[:, 0] = 255
    hard = np.where(label == 1, BITS["thin"], BITS["confusable"]).astype(np.uint8)
    hard[label == 255] = 0
    return label, hard


def write_snapshot(run_dir, it, hl_road=0.2, hl_pole=0.8, full=True):
    """A maps_<it>.npz as the trainer writes it (full=False: the older format without image, pred, names, kinds)."""
    label, hard = _scene()
    hl = np.where(label == 1, hl_pole, hl_road).astype(np.float16)
    hl[label == 255] = 5.0  # ignored pixels must not enter any mean
    loss = np.where(label == 1, 2.0, 0.5).astype(np.float16)
    if full:
        save_snapshot(run_dir, it, hl=hl[:, None], loss=loss, label=label, hard=hard,
                      image=np.zeros((1, 3, *label.shape[1:]), np.uint8), pred=np.zeros_like(label), classes=CLASSES,
                      palette=[(128, 64, 128), (153, 153, 153)], kinds=BITS)
        return
    (run_dir / "hl_maps").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(run_dir / "hl_maps" / f"maps_{it:06d}.npz", hl=hl[:, None], loss=loss, label=label, hard=hard)


def _titles(fig):
    return [ax.get_title() for ax in fig.axes if ax.images and ax.get_subplotspec() is not None]


def test_class_and_kind_hardness_over_labelled_pixels(tmp_path):
    write_snapshot(tmp_path, 10, hl_road=0.1, hl_pole=0.3)
    write_snapshot(tmp_path, 20)
    by_class = class_hardness(tmp_path)  # the last snapshot
    assert by_class["class"].tolist() == ["pole", "road"]  # hardest first
    assert by_class["mean HL"].tolist() == pytest.approx([0.8, 0.2], abs=1e-3)
    assert by_class["pixels"].tolist() == [20, 20] and by_class["mean CE loss"].tolist() == [2.0, 0.5]
    assert class_hardness(tmp_path, it=10)["mean HL"].tolist() == pytest.approx([0.3, 0.1], abs=1e-3)
    kinds = kind_hardness(tmp_path).set_index("kind")
    assert kinds.index.tolist() == ["thin", "confusable", "none"]
    assert kinds.loc["thin", "mean HL"] == pytest.approx(0.8, abs=1e-3) and kinds.loc["thin", "share"] == 0.5
    assert kinds.loc["none", "pixels"] == 0


def test_older_snapshot_takes_names_from_the_summary_and_skips_missing_columns(tmp_path):
    write_snapshot(tmp_path, 10, full=False)
    (tmp_path / "summary.json").write_text(json.dumps({"final": {"IoU": {"sky": 0.1, "tree": 0.2}}}))
    assert class_hardness(tmp_path)["class"].tolist() == ["tree", "sky"]
    assert kind_hardness(tmp_path).empty  # the file does not say what its bits mean
    assert _titles(snapshot_figure(tmp_path))[:3] == ["ground truth", "HL map h", "CE loss"]


def test_snapshot_figure_draws_every_column_of_a_full_snapshot(tmp_path):
    write_snapshot(tmp_path, 10)
    titles = _titles(snapshot_figure(tmp_path))
    assert titles == ["image", "ground truth", "prediction", "HL map h", "CE loss", "hardness kinds, rarest on top"]


def test_snapshot_grid_spreads_snapshots_and_shares_a_scale_per_row(tmp_path):
    for it in (10, 20, 30, 40, 50):
        write_snapshot(tmp_path, it, hl_pole=0.2 + it / 100)
    fig = snapshot_grid(tmp_path, max_snapshots=3)
    titles = _titles(fig)
    assert titles[:4] == ["image", "HL map h, iter 10", "HL map h, iter 30", "HL map h, iter 50"]
    hl_images = [ax.images[0] for ax in fig.axes if ax.get_title().startswith("HL map h")]
    assert {im.get_clim() for im in hl_images} == {hl_images[0].get_clim()}
    assert hl_images[0].get_clim()[1] == pytest.approx(0.7, abs=1e-3)  # max over the shown snapshots
    assert sum(ax.get_label() == "<colorbar>" for ax in fig.axes) == 2
    with pytest.raises(IndexError, match="image 3"):
        snapshot_grid(tmp_path, image=3)


def test_missing_snapshots_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no maps_"):
        snapshot_at(tmp_path)
    write_snapshot(tmp_path, 10)
    with pytest.raises(KeyError, match=r"iteration 20; snapshots: \[10\]"):
        snapshot_at(tmp_path, 20)


def _semisup_rows():
    rows = []
    for seed in (0, 1):
        for row, col, best, rescored in (("U2PL", "1/8", 0.70, 0.72), ("U2PL + HL", "1/8", 0.74, None),
                                         ("U2PL", "1/4", 0.75, None)):
            rows.append({"experiment": f"{row}-{col}", "seed": seed, "split.source": f"u2pl/{col}",
                         "paper.row": row, "paper.column": col, "best.mIoU": best + seed / 100,
                         "best.rescored.mIoU": None if rescored is None else rescored + seed / 100,
                         "final.mIoU": 0.6})
    rows.append({"experiment": "fullsup/fcn", "seed": 0, "split.source": None, "final.mIoU": 0.5})
    return pd.DataFrame(rows)


def test_methods_by_split_uses_cards_and_the_reference_rule():
    runs = _semisup_rows()
    assert len(semisup_runs(runs)) == 6  # the fully supervised run has no split
    table = methods_by_split(runs)
    assert table.index.tolist() == ["U2PL", "U2PL + HL"] and table.columns.tolist() == ["1/8", "1/4"]
    assert table.loc["U2PL", "1/8"] == "72.50 ± 0.71 (2)"  # re-scored numbers where the card's protocol re-scored
    assert table.loc["U2PL + HL", "1/8"] == "74.50 ± 0.71 (2)"
    assert table.loc["U2PL + HL", "1/4"] == ""  # no run in that cell
    assert methods_by_split(runs, "last iteration").loc["U2PL", "1/4"] == "60.00 ± 0.00 (2)"
    with pytest.raises(KeyError, match="rule"):
        methods_by_split(runs, "best")


def test_methods_by_class_averages_each_class_over_seeds_per_method():
    rows = [{"experiment": e, "seed": seed, "split.source": "seeded(0.125, 0)", "final.IoU.car": car + seed / 10,
             "final.IoU.road": 0.9, "final.IoU.sky": None}
            for e, car in (("suponly", 0.2), ("u2pl", 0.0)) for seed in (0, 1)]
    table = methods_by_class(pd.DataFrame(rows))
    assert table.index.tolist() == ["suponly", "u2pl"] and table.columns.tolist() == ["car", "road"]
    assert table.loc["suponly", "car"] == 25.0 and table.loc["u2pl", "car"] == 5.0 and table.loc["u2pl", "road"] == 90
    with pytest.raises(ValueError, match="name one with column="):
        methods_by_class(_semisup_rows())  # two splits: which one is not guessed


def test_runs_without_cards_fall_back_to_experiment_and_split_source():
    runs = pd.DataFrame([{"experiment": "semisup_synthetic/u2pl", "seed": 0, "split.source": "seeded(0.125, 0)",
                          "best.mIoU": 0.3, "final.mIoU": 0.2}])
    table = methods_by_split(runs)
    assert table.index.tolist() == ["semisup_synthetic/u2pl"] and table.columns.tolist() == ["seeded(0.125, 0)"]
    assert table.iloc[0, 0] == "30.00 (1)"
