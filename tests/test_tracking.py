"""Run folder files, environment record, HL-map panels and the Tracker (local files + W&B offline)."""
import json
import logging
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import yaml

from hlbench.errors import ConfigError
from hlbench.tracking import (Tracker, append_jsonl, atomic_write_json, current_metrics, environment_record,
                              read_jsonl)
from hlbench.tracking.tracker import wandb_mode
from tests.conftest import offline_records

CLASSES = ["road", "car", "pole"]
PALETTE = [(128, 64, 128), (0, 0, 142), (153, 153, 153)]


def _batch(n=2, h=8, w=12, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, h, w), dtype=np.uint8)
    hl = rng.normal(size=(n, h, w)).astype(np.float32)
    labels = rng.integers(0, 3, (n, h, w))
    labels[:, 0] = 255
    preds = rng.integers(0, 3, (n, h, w))
    return images, hl, labels, preds


def _tracker(run_dir, **kw):
    return Tracker(run_dir, {"model": {"name": "pspnet"}, "seed": 0}, project="hlbench-test", group="g",
                   job_type="train", tags=["test"], name="run", class_names=CLASSES, palette=PALETTE, **kw)


def test_tracker_without_wandb_writes_run_folder(tmp_path):
    run = tmp_path / "run"
    tr = _tracker(run, logger="none", env_extra={"world_size": 1, "effective_batch": 8})
    tr.log("train", 50, {"lr": 0.01, "decode.loss_ce": 1.5, "loss": 2.0})
    tr.log("val", 50, {"mIoU": 0.5, "IoU.road": float("nan")})
    tr.log_hl_maps(50, *_batch())
    tr.write_summary({"experiment": "x", "final": {"iter": 50, "mIoU": 0.5}})
    tr.finish()
    tr.finish()  # second call is a no-op

    assert yaml.safe_load((run / "config.yaml").read_text()) == {"model": {"name": "pspnet"}, "seed": 0}
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 1 and env["effective_batch"] == 8 and env["devices"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"mode": "train", "iter": 50, "lr": 0.01, "decode.loss_ce": 1.5, "loss": 2.0}
    assert lines[1] == {"mode": "val", "iter": 50, "mIoU": 0.5, "IoU.road": None}  # NaN -> null (strict JSON)
    assert json.loads((run / "summary.json").read_text())["final"]["mIoU"] == 0.5
    assert (run / "hl_maps" / "iter_000050.png").is_file()
    assert not (run / "wandb").exists() and not (run / "wandb_id.txt").exists()


def test_tracker_rank_nonzero_writes_nothing(tmp_path):
    tr = _tracker(tmp_path / "run", logger="wandb", rank=1)
    tr.log("train", 1, {"loss": 1.0})
    tr.log_hl_maps(1, *_batch())
    tr.write_summary({"a": 1})
    tr.finish()
    assert not (tmp_path / "run").exists()


def test_resume_keeps_earlier_lines_and_readers_supersede_them(tmp_path):
    run = tmp_path / "run"
    tr = _tracker(run, logger="none")
    for it in (10, 20, 30):
        tr.log("train", it, {"loss": float(it)})
    tr.log("val", 20, {"mIoU": 0.2})
    tr.finish()

    tr = _tracker(run, logger="none", resumed_from=20)
    tr.log("train", 30, {"loss": 3.5})
    tr.finish()

    records = read_jsonl(run / "metrics.jsonl")
    assert [r["iter"] for r in records if r["mode"] == "train"] == [10, 20, 30, 30]  # nothing truncated
    assert {"mode": "resume", "iter": 20} == {k: records[4][k] for k in ("mode", "iter")}
    assert (run / "env.resume-20.json").is_file()
    current = {(r["mode"], r["iter"]): r for r in current_metrics(records)}
    assert sorted(current) == [("train", 10), ("train", 20), ("train", 30), ("val", 20)]
    assert current[("train", 30)]["loss"] == 3.5


def test_resume_marker_drops_abandoned_iterations(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for rec in ({"mode": "train", "iter": 10}, {"mode": "train", "iter": 40}, {"mode": "val", "iter": 40},
                {"mode": "resume", "iter": 20}, {"mode": "train", "iter": 30}):
        append_jsonl(path, rec)
    assert [(r["mode"], r["iter"]) for r in current_metrics(read_jsonl(path))] == [("train", 10), ("train", 30)]


def test_append_after_interrupted_line_starts_a_new_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"mode": "train", "iter": 1})
    with open(path, "a") as f:
        f.write('{"mode": "tra')  # a crash in the middle of a write
    append_jsonl(path, {"mode": "train", "iter": 2})
    with pytest.warns(UserWarning, match="metrics.jsonl:2"):
        assert [r["iter"] for r in read_jsonl(path)] == [1, 2]


def test_atomic_write_leaves_no_temp_files(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": np.float32(0.5), "b": (1, 2)})
    assert json.loads(target.read_text()) == {"a": 0.5, "b": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(target, {"a": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    assert json.loads(target.read_text())["a"] == 0.5  # the failed write left the old file intact


def test_environment_record_never_raises_outside_git(monkeypatch):
    monkeypatch.setenv("GIT_DIR", "/nonexistent")  # makes every git command fail
    env = environment_record({"seed": 3})
    assert env["git"] == {"commit": None, "dirty": None}
    assert env["seed"] == 3 and env["torch"] and env["python"].count(".") == 2


def test_wandb_mode_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    assert wandb_mode() == "online"


def test_tracker_wandb_offline_and_resume_reuses_run_id(wandb_offline, tmp_path):
    run = tmp_path / "run"
    tr = _tracker(run, logger="wandb")
    tr.log("train", 10, {"loss": 1.0, "lr": 0.1})
    tr.log("val", 10, {"mIoU": 0.5})
    tr.log("train", 5, {"loss": 2.0})  # lower step: goes to the summary instead of crashing
    tr.log_hl_maps(10, *_batch())
    tr.log_class_iou(10, {"road": 0.9, "car": 0.5, "pole": 0.1})
    tr.write_summary({"final": {"mIoU": 0.5}, "hl_auroc": None})
    tr.finish()
    tr.finish()
    run_id = (run / "wandb_id.txt").read_text().strip()
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    assert list(offline[0].rglob("*.table.json")) and list(offline[0].rglob("panel_10_*.png"))

    tr = _tracker(run, logger="wandb", resumed_from=10)
    assert tr._run.id == run_id
    tr.finish()
    assert (run / "wandb_id.txt").read_text().strip() == run_id


# What a training process does with a Tracker, in a process of its own: W&B's console capture hooks the
# sys.stdout/sys.stderr present when wandb is imported, which pytest's capture fixtures replace.
TRAINING_SCRIPT = """
import sys
import numpy as np
from hlbench.tracking import Tracker
tr = Tracker("run", {"model": {"name": "pspnet"}}, logger="wandb", project="hlbench-test", entity="hl-team",
             class_names=["road", "car", "pole"])
print("a training log line", file=sys.stderr)
tr.log("train", 10, {"loss": 1.0, "lr": 0.1})
tr.log("val", 10, {"mIoU": 0.5})
zeros = np.zeros((1, 8, 8), dtype=np.int64)
tr.log_hl_maps(10, np.zeros((1, 3, 8, 8), dtype=np.uint8), np.ones((1, 8, 8), dtype=np.float32), zeros, zeros)
tr.write_summary({"final": {"mIoU": 0.5}})
tr.finish()
print("the results table")
"""


@pytest.mark.slow
def test_wandb_console_is_our_one_line_and_the_offline_run_keeps_everything(wandb_offline, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_SILENT")  # the Tracker itself must keep W&B quiet
    res = subprocess.run([sys.executable, "-c", TRAINING_SCRIPT], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert res.stdout == "the results table\n"
    sync_dir = offline.relative_to(tmp_path)  # relative, as W&B keeps the relative dir= it was given
    assert res.stderr == f"W&B offline run; to upload it: wandb sync {sync_dir}\na training log line\n"

    records = offline_records(offline)
    (run_record,) = [r["run"] for r in records if r["type"] == "run"]
    assert run_record["entity"] == "hl-team" and run_record["project"] == "hlbench-test"
    assert "pspnet" in json.dumps(run_record["config"])
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [(h["_step"], h.get("train/loss"), h.get("val/mIoU")) for h in history] == [(10, 1.0, 0.5)]
    assert history[0]["hl_maps/panel._type"] == "image-file" and list(offline.rglob("panel_10_*.png"))
    summary = {k: v for r in records if r["type"] == "summary" for k, v in r["summary"].get("update", {}).items()}
    assert summary["final/mIoU"] == 0.5
    # console capture: our lines are in the run's Logs; the table, printed after finish, is not
    console = "".join(r["output_raw"]["line"] for r in records if r["type"] == "output_raw")
    assert "W&B offline run" in console and "a training log line" in console
    assert "the results table" not in console


def test_online_run_line_is_its_url_and_init_gets_entity_and_silence(wandb_offline, tmp_path, monkeypatch, capfd):
    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        return types.SimpleNamespace(step=0, disabled=False, offline=False, url="https://wandb.ai/hl-team/p/runs/x",
                                     finish=lambda exit_code: None, define_metric=lambda name, summary: None)

    monkeypatch.setattr(wandb_offline, "init", fake_init)
    tr = _tracker(tmp_path / "run", logger="wandb", entity="hl-team")
    tr.finish()
    assert capfd.readouterr() == ("", "W&B run: https://wandb.ai/hl-team/p/runs/x\n")
    _tracker(tmp_path / "default", logger="wandb").finish()
    assert [(c["entity"], c["project"], c["settings"].silent) for c in calls] == [("hl-team", "hlbench-test", True),
                                                                                  (None, "hlbench-test", True)]


def test_tracker_survives_wandb_init_failure(wandb_offline, tmp_path, monkeypatch, caplog):
    def broken_init(**kwargs):
        raise RuntimeError("no W&B today")

    monkeypatch.setattr(wandb_offline, "init", broken_init)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="hlbench.tracking.tracker"):
        tr = _tracker(run, logger="wandb")
        tr.log("train", 1, {"loss": 1.0})
        tr.log_class_iou(1, {"road": 0.5})
        tr.write_summary({"final": {"mIoU": 0.1}})
        tr.finish(exit_code=1)
    assert sum("no W&B today" in r.getMessage() for r in caplog.records) == 1
    assert (run / "metrics.jsonl").is_file() and (run / "summary.json").is_file()
    assert not (run / "wandb").exists()


def test_unknown_logger_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="'tensorboard'"):
        _tracker(tmp_path, logger="tensorboard")
    assert os.listdir(tmp_path) == []
