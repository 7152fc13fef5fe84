"""analysis.dashboard: the report plan from run folders, its offline printout, the wandb-workspaces objects, and the
stability runs it uploads (offline, read back)."""
import pytest

from analysis.dashboard import build_report, dashboard_plan, format_plan, main, stability_uploads, upload_stability
from analysis.runs import load_runs
from hlbench.tracking import atomic_write_json, write_config
from tests.conftest import offline_records, SMOKE_HL_RUN
from tests.test_analysis_notebook_helpers import write_snapshot

CLASSES = ["road", "pole"]


def _run(root, experiment, hl, seed=0, suite="smoke", group="smoke", snapshots=()):
    run_dir = root / suite / experiment.replace("/", "-") / f"seed{seed}"
    write_config(run_dir, {"seed": seed, "hl": {"enabled": hl}})
    name = f"{experiment}-s{seed}"
    atomic_write_json(run_dir / "summary.json", {
        "experiment": experiment, "suite": suite, "seed": seed, "hl": hl,
        "final": {"mIoU": 0.5, "IoU": {c: 0.5 for c in CLASSES}}, "best": {"mIoU": 0.6},
        "wandb_run": {"name": name, "group": group, "job_type": "smoke", "tags": ["hl" if hl else "baseline"]}})
    (run_dir / "wandb_id.txt").write_text(f"id{experiment[-2:]}{seed}\n")
    for it in snapshots:
        write_snapshot(run_dir, it, hl_pole=0.5 + it / 100)
    return run_dir


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    _run(root, "smoke/pspnet_r18_tiny", False)
    _run(root, SMOKE_HL_RUN, True, snapshots=(10, 20, 30))
    _run(root, "fullsup/fcn_r101", False, suite="fullsup", group="fullsup-smoke")
    return root


def test_plan_has_one_section_per_group_with_baseline_vs_hl_panels(runs_root):
    plan = dashboard_plan(load_runs(runs_root), "hlbench", None, "T")
    assert [s["group"] for s in plan["sections"]] == ["fullsup-smoke", "smoke"]
    smoke = plan["sections"][1]
    assert smoke["title"].startswith("smoke: baseline vs HL")  # the suite file's table title
    assert (smoke["runs"], smoke["baseline"], smoke["hl"]) == (2, 1, 1)
    assert smoke["filter"] == "Metric('group') == 'smoke'" and smoke["groupby"] == "config.hl.enabled"
    assert [p["type"] for p in smoke["panels"]] == ["line", "bar", "bar", "media", "line"]
    assert smoke["panels"][2]["metrics"] == ["final/IoU/road", "final/IoU/pole"]
    assert "hl_stability/hl_rank_corr" in smoke["panels"][4]["y"]
    # a group without HL runs gets neither HL maps nor stability curves
    assert [p["type"] for p in plan["sections"][0]["panels"]] == ["line", "bar", "bar"]
    (stab,) = plan["stability_runs"]
    assert (stab["id"], stab["group"], stab["job_type"]) == ("idhl0-hl_stability", "smoke", "hl_stability")
    assert stab["tags"] == ["hl", "analysis:hl_stability"] and stab["curves"]["iter"].tolist() == [20, 30]


def test_offline_main_prints_the_plan_and_creates_nothing(runs_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["--runs", str(runs_root), "--entity", "hl-team"]) == 0
    out = capsys.readouterr().out
    assert "W&B report 'hlbench: baseline vs HL' in hl-team/hlbench (would create)" in out
    assert "section smoke: baseline vs HL" in out and "2 runs: 1 baseline, 1 HL" in out
    assert "media HL maps" in out and "stability run smoke/pspnet_r18_tiny+hl-s0-stability" in out
    assert "W&B mode is offline: nothing created" in out
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert main(["--runs", str(tmp_path / "missing")]) == 2
    assert "runs folder not found" in capsys.readouterr().err


def test_empty_runs_folder_plans_an_empty_report(tmp_path):
    plan = dashboard_plan(load_runs(tmp_path), "p", "e", "T")
    assert plan["sections"] == [] and "no runs found" in format_plan(plan)


def test_report_objects_follow_the_plan(runs_root):
    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    plan = dashboard_plan(load_runs(runs_root), "hlbench", "hl-team", "T")
    report = build_report(plan)
    assert (report.entity, report.project, report.title) == ("hl-team", "hlbench", "T")
    headings = [b for b in report.blocks if isinstance(b, wr.H2)]
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert len(headings) == len(grids) == 2
    (runset,) = grids[1].runsets
    assert runset.filters == "Metric('group') == 'smoke'" and runset.groupby == ["config.hl.enabled"]
    line, bars, per_class, media, stability = grids[1].panels
    assert isinstance(line, wr.LinePlot) and line.y == ["val/mIoU"] and line.groupby_rangefunc == "stddev"
    assert isinstance(per_class, wr.BarPlot) and per_class.metrics == ["final/IoU/road", "final/IoU/pole"]
    assert isinstance(media, wr.MediaBrowser) and media.media_keys[0] == "hl_maps/panel"
    assert "hl_stability/loss_rank_corr" in stability.y


def test_stability_upload_offline_is_one_run_with_a_point_per_snapshot(runs_root, wandb_offline, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    (upload,) = stability_uploads(load_runs(runs_root))
    assert upload_stability(upload, "hlbench-test", None, "offline") == "idhl0-hl_stability"
    (offline,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    records = offline_records(offline)
    (info,) = [r["run"] for r in records if r["type"] == "run"]
    assert (info["run_group"], info["job_type"], info["display_name"]) == ("smoke", "hl_stability",
                                                                          "smoke/pspnet_r18_tiny+hl-s0-stability")
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [h["_step"] for h in history] == [20, 30]
    assert all("hl_stability/hl_rank_corr" in h and "hl_stability/loss_rank_corr" in h for h in history)


def test_a_lone_experiment_run_is_titled_by_its_group_not_the_config_default_suite(tmp_path):
    run_dir = _run(tmp_path, "fullsup/fcn_r101", False, suite="runs", group="fullsup")
    write_config(run_dir, {"seed": 0, "suite": "smoke", "hl": {"enabled": False}})  # the command's default suite
    summary = run_dir / "summary.json"
    summary.write_text(summary.read_text().replace('"suite": "runs"', '"suite": null'))
    (section,) = dashboard_plan(load_runs(tmp_path), "p", None, "T")["sections"]
    assert section["title"].startswith("Cityscapes architectures") and section["title"].endswith("(fullsup)")
