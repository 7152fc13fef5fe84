"""analysis: loading run folders, metrics.jsonl, mean ± std tables."""
import json
import math
import os

import pandas as pd
import pytest
import yaml

from analysis import aggregate, format_mean_std, format_table, load_runs, read_metrics
from analysis.runs import PROJECT_ROOT, notebook_runs, repeats_note, runs_folder
from analysis.semisup import read_summaries


def _write_run(run_dir, *, hl: bool, seed: int, miou: float, suite="supervised"):
    run_dir.mkdir(parents=True)
    config = {"suite": suite, "seed": seed, "method": {"name": "supervised"}, "model": {"name": "pspnet"},
              "hl": {"enabled": hl}, "data": {"name": "synthetic"}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    final = {"iter": 100, "mIoU": miou, "mAcc": 0.8, "aAcc": 0.9, "IoU": {"road": 0.9, "traffic light": 0.1},
             "protocol": {"mode": "whole"}}
    summary = {"experiment": "pspnet_synth", "suite": None, "seed": seed, "iters": 100, "train_time_s": 1.5,
               "final": final, "best": dict(final, mIoU=miou + 0.01), "hl_auroc": 0.7 if hl else None,
               "thin_small_IoU": 0.2, "paper": None}
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def runs_root(tmp_path):
    _write_run(tmp_path / "g" / "base_s0" / "t1", hl=False, seed=0, miou=0.60)
    _write_run(tmp_path / "g" / "base_s1" / "t1", hl=False, seed=1, miou=0.64)
    _write_run(tmp_path / "hl_s0", hl=True, seed=0, miou=0.70)
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "not_a_run" / "summary.json").write_text("{}")  # no config.yaml: skipped
    return tmp_path


def test_load_runs_flattens_summary_and_config_axes(runs_root):
    df = load_runs(runs_root)
    assert len(df) == 3
    assert list(df.columns[:9]) == ["run_dir", "experiment", "suite", "seed", "method.name", "model.name",
                                    "hl.enabled", "data.name", "data.split"]
    row = df[df["hl.enabled"]].iloc[0]
    assert row["final.mIoU"] == 0.70 and row["best.mIoU"] == pytest.approx(0.71)
    assert row["final.IoU.traffic light"] == 0.1 and row["hl_auroc"] == 0.7
    # null in summary.json (a lone experiment= run): the config's `suite` is the command's default, not the run's
    assert row["suite"] is None
    assert row["model.name"] == "pspnet" and row["experiment"] == "pspnet_synth"
    assert row["run_dir"].endswith("hl_s0")


def test_load_runs_missing_root_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_runs(tmp_path / "nope")
    assert load_runs(tmp_path).empty


def test_aggregate_mean_std_n_and_format(runs_root):
    agg = aggregate(load_runs(runs_root), by=["hl.enabled"], metrics=["final.mIoU", "hl_auroc"])
    base = agg[~agg["hl.enabled"]].iloc[0]
    assert base["final.mIoU mean"] == pytest.approx(0.62)
    assert base["final.mIoU std"] == pytest.approx(math.sqrt(2 * 0.02 ** 2))  # sample std (ddof=1)
    assert base["final.mIoU n"] == 2 and base["hl_auroc n"] == 0
    hl = agg[agg["hl.enabled"]].iloc[0]
    assert hl["final.mIoU n"] == 1 and math.isnan(hl["final.mIoU std"])

    text = format_mean_std(agg)
    assert list(text.columns) == ["hl.enabled", "final.mIoU", "hl_auroc"]
    assert text.loc[~text["hl.enabled"], "final.mIoU"].item() == "62.00 ± 2.83 (2)"
    assert text.loc[text["hl.enabled"], "final.mIoU"].item() == "70.00 (1)"  # one sample: no spread to show
    assert text.loc[~text["hl.enabled"], "hl_auroc"].item() == "–"

    with pytest.raises(KeyError, match="final.nope"):
        aggregate(load_runs(runs_root), by=["hl.enabled"], metrics=["final.nope"])


def test_format_table_fixed_width(runs_root):
    table = format_table(format_mean_std(aggregate(load_runs(runs_root), ["hl.enabled"], ["final.mIoU"])))
    lines = table.splitlines()
    assert lines[0].split("|")[1].strip() == "hl.enabled"
    assert set(lines[1]) == {"|", "-"}
    assert len({len(line) for line in lines}) == 1  # every line equally wide
    assert "| 62.00 ± 2.83 (2) |" in lines[2]


def test_format_table_keeps_a_pipe_inside_one_cell():
    table = format_table(pd.DataFrame({"row": ["fcn"], "HL": ["70.5 | 75.9"]}))
    assert table.splitlines()[2] == "| fcn | 70.5 \\| 75.9 |"


def _repeat(root, folder, miou, mtime):
    run_dir = root / "smoke" / "smoke-pspnet_r18_tiny+hl" / folder
    _write_run(run_dir, hl=True, seed=0, miou=miou, suite="smoke")
    os.utime(run_dir / "summary.json", (mtime, mtime))
    return run_dir


def test_a_repeated_seed_counts_once_its_newest_complete_run(tmp_path):
    _repeat(tmp_path, "seed0", 0.50, mtime=2_000)
    newest = _repeat(tmp_path, "seed0-2", 0.60, mtime=3_000)
    # still running: no summary
    (tmp_path / "smoke" / "smoke-pspnet_r18_tiny+hl" / "seed0-3" / "checkpoints").mkdir(parents=True)
    _repeat(tmp_path, "seed0-4", 0.40, mtime=1_000)  # written before the others finished
    other_seed = tmp_path / "smoke" / "smoke-pspnet_r18_tiny+hl" / "seed1"
    _write_run(other_seed, hl=True, seed=1, miou=0.70)
    profile_run = tmp_path / "smoke" / "smoke-pspnet_r18_tiny+hl-smoke" / "seed0"  # a profile's dry run: another sample
    _write_run(profile_run, hl=True, seed=0, miou=0.10)
    other_split = _repeat(tmp_path, "seed0-5", 0.30, mtime=4_000)  # data.split_fraction=... : another sample too
    summary = json.loads((other_split / "summary.json").read_text())
    (other_split / "summary.json").write_text(json.dumps(dict(summary, split={"source": "seeded(0.25, 0)"})))

    runs = load_runs(tmp_path)
    assert sorted(runs["run_dir"]) == sorted(map(str, [newest, other_seed, profile_run, other_split]))
    assert runs.loc[runs["run_dir"] == str(newest), "final.mIoU"].item() == 0.60
    note = repeats_note(runs)
    assert note.startswith(f"counted {newest} (newest of 3 runs") and "seed0-4" in note and "seed0," in note
    assert [s["run_dir"] for s in read_summaries(tmp_path) if s["seed"] == 0] == [
        str(p) for p in sorted([newest, profile_run, other_split])]


def test_runs_folder_defaults_to_the_project_outputs_and_resolves_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PWD", raising=False)
    assert runs_folder(None) == PROJECT_ROOT / "outputs"
    assert runs_folder(str(tmp_path / "x")) == tmp_path / "x"  # absolute: as given
    (tmp_path / "here").mkdir()
    assert runs_folder("here") == tmp_path / "here"  # exists from the working folder
    # a notebook kernel works in notebooks/: a path given from where jupyter started ($PWD) or from the project root
    started = tmp_path / "started"
    (started / "mine").mkdir(parents=True)
    monkeypatch.setenv("PWD", str(started))
    assert runs_folder("mine") == started / "mine"
    assert runs_folder("tests") == PROJECT_ROOT / "tests"
    assert runs_folder("nowhere") == PROJECT_ROOT / "nowhere"


def test_notebook_runs_prints_the_folder_and_warns_when_it_holds_no_run(tmp_path, capsys):
    with pytest.warns(UserWarning, match="does not exist: run `make run`, or set HLBENCH_RUNS"):
        folder, runs = notebook_runs(str(tmp_path / "missing"))
    assert runs.empty and "experiment" in runs.columns
    assert f"runs folder: {folder}" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="holds no run folder"):
        notebook_runs(str(tmp_path))


def test_read_metrics_keeps_last_occurrence_per_mode_and_iter(tmp_path):
    lines = [{"mode": "train", "iter": 10, "loss": 1.0}, {"mode": "val", "iter": 10, "mIoU": 0.1},
             {"mode": "train", "iter": 20, "loss": 0.9}, {"mode": "resume", "iter": 10},
             {"mode": "train", "iter": 20, "loss": 0.8}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    df = read_metrics(tmp_path)
    assert list(zip(df["mode"], df["iter"])) == [("train", 10), ("val", 10), ("train", 20)]
    assert df.loc[df["iter"] == 20, "loss"].item() == 0.8
