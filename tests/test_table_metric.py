"""The metric a data set's tables report: iSAID's mIoU over all 16 classes and every patch, TotalText's fgIoU (the
character class's IoU) declared by data.metric and carried through the evaluation, summary, runner and suite tables;
data sets that declare none keep their outputs."""
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis.suite_tables import suite_table
from hlbench.data.__main__ import main
from hlbench.data.totaltext import CLASSES as TOTALTEXT_CLASSES
from hlbench.engine.summary import summary_entry
from hlbench.errors import ConfigError
from hlbench.metrics import ConfusionMatrix, declared_metrics, table_metric
from hlbench.report import comparison_table
from hlbench.run import run_experiment
from tests.conftest import compose_run


def test_isaid_miou_includes_background_and_counts_overlapping_patches_each_time():
    cm, once = ConfusionMatrix(16), ConfusionMatrix(16)
    label = torch.tensor([[0, 0, 9, 9, 255], [0, 0, 9, 9, 255]])
    pred = torch.tensor([[0, 9, 9, 9, 5], [0, 0, 0, 3, 5]])
    once.update(pred, label)
    for _ in range(2):  # two overlapping patches holding the same pixels: both count, as in mmseg
        cm.update(pred, label)
    assert torch.equal(cm.mat, 2 * once.mat)
    metrics = cm.compute()
    # Class 3 is predicted but absent: IoU 0, counted; class 5 only where the label is ignored: left out.
    iou_background, iou_small_vehicle = 3 / 5, 2 / 5
    assert metrics["mIoU"] == pytest.approx((iou_background + iou_small_vehicle + 0) / 3)


def test_fgiou_is_the_character_iou_where_the_data_set_declares_it():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[0, 1, 1, 0]]), torch.tensor([[0, 1, 0, 1]]))
    metrics = cm.compute(list(TOTALTEXT_CLASSES))
    assert declared_metrics(metrics, "fgIoU", list(TOTALTEXT_CLASSES)) == {"fgIoU": metrics["IoU.Character"]}
    assert declared_metrics(metrics, "mIoU", list(TOTALTEXT_CLASSES)) == {}
    with pytest.raises(ConfigError, match="data.metric='fgiou' is not valid"):
        declared_metrics(metrics, "fgiou", list(TOTALTEXT_CLASSES))
    with pytest.raises(ConfigError, match="data.metric=fgIoU needs two classes"):
        declared_metrics(metrics, "fgIoU", ["a", "b", "c"])
    plain = summary_entry(4, metrics, {"mode": "whole"}, "final", "student", list(TOTALTEXT_CLASSES))
    assert list(plain) == ["iter", "mIoU", "mAcc", "aAcc", "IoU", "protocol"] and table_metric(plain) == "mIoU"
    metrics["fgIoU"] = metrics["IoU.Character"]
    entry = summary_entry(4, metrics, {"mode": "whole"}, "final", "student", list(TOTALTEXT_CLASSES))
    assert entry["fgIoU"] == entry["IoU"]["Character"] and table_metric(entry) == "fgIoU"


def _summary(experiment: str, metric: str | None = None) -> dict:
    summary = {"experiment": experiment, "hl": False, "final": {"mIoU": 0.84, "fgIoU": 0.70}, "report_IoU": None,
               "hl_auroc": None, "train_time_s": 10.0, "s_per_iter": 0.5, "paper": {"value": 66.62}, "profile": None}
    return {**summary, "metric": metric} if metric else summary


def test_runner_table_adds_the_declared_metric_and_its_paper_number_and_keeps_the_default():
    default = comparison_table([_summary("fullsup/fcn_r101")]).splitlines()
    assert default[0].split() == ["experiment", "HL", "mIoU", "thin/small", "IoU", "HL", "AUROC", "train", "s",
                                  "s/iter", "paper", "mIoU", "paper", "s/iter"]
    header, _, row = comparison_table([_summary("totaltext/fcn_hr18s", "fgIoU")]).splitlines()[:3]
    assert header.split()[2:4] == ["mIoU", "fgIoU"] and "paper fgIoU" in header
    assert row.split()[2:6] == ["84.00", "(1)", "70.00", "(1)"] and "66.62" in row


def test_suite_table_shows_the_declared_metric(tmp_path, monkeypatch):
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "tt.yaml").write_text(
        "table: TotalText\ncells:\n"
        "  - {row: fcn_hr18s, column: baseline, experiment: tt/fcn_hr18s, value: 66.62}\n"
        "  - {row: pspnet_r18, column: baseline, experiment: tt/pspnet_r18, value: 49.43}\n")
    monkeypatch.setenv("HLBENCH_EXPERIMENTS_DIR", str(tmp_path))
    runs = pd.DataFrame([{"experiment": "tt/fcn_hr18s", "seed": 0, "final.mIoU": 0.84, "final.fgIoU": 0.70,
                          "best.mIoU": 0.85, "best.fgIoU": 0.72, "metric": "fgIoU"}])
    table = suite_table(runs, "tt")
    assert table.loc["fcn_hr18s", "baseline"] == "70.00 (1); paper 66.62" and "final fgIoU" in table.attrs["title"]
    assert suite_table(runs, "tt", "best").loc["fcn_hr18s", "baseline"] == "72.00 (1); paper 66.62"
    plain = suite_table(runs.drop(columns=["metric"]), "tt")
    assert plain.loc["fcn_hr18s", "baseline"] == "84.00 (1); paper 66.62" and "final," in plain.attrs["title"]


def test_a_totaltext_run_records_and_reports_fgiou(hydra_ctx, tmp_path):
    root = tmp_path / "totaltext_char"
    assert main(["mock", "totaltext", "--root", str(root), "--n", "2", "--size", "48", "64"]) == 0
    assert main(["prepare", "totaltext", "--root", str(root), "--workers", "1"]) == 0
    cfg, _, _ = compose_run(["data=totaltext", f"data.root={root}", "logger=none", "train.memory_check=false",
                             "train.iters=2", "train.batch_size=2", "train.num_workers=0", "train.log_interval=1",
                             "train.eval_interval=0", "train.ckpt_interval=2", "train.hl_map_interval=0",
                             "data.train_pipeline.crop=[32,32]", "data.train_pipeline.resize.scale=[64,32]",
                             "data.test_pipeline.resize.scale=[64,32]"], tmp_path / "out")
    summary = run_experiment(cfg, "totaltext_check", None, None)
    assert summary["metric"] == "fgIoU" and summary["final"]["fgIoU"] == summary["final"]["IoU"]["Character"]
    assert summary["best"]["fgIoU"] == summary["final"]["fgIoU"]
    lines = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert any(x["mode"] == "val" and x["fgIoU"] == x["IoU.Character"] for x in lines)
    assert "fgIoU" in comparison_table([summary]).splitlines()[0]
