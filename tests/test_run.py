"""End-to-end runs of the runner on tiny synthetic configs: outputs, resume, seeds, CLI, multirun, DDP."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hlbench.errors import BadFileError, RunStopped
from hlbench.run import run, run_experiment
from hlbench.suites import load_suite
from tests.conftest import compose_run, REPO, sigterm_during_step, SMOKE_HL, SMOKE_HL_RUN, TINY

pytestmark = pytest.mark.slow


def _lines(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_smoke_suite_writes_run_folders_and_table(hydra_ctx, tmp_path, capsys):
    cfg, choices, overrides = compose_run(TINY, tmp_path)
    summaries = run(cfg, choices, overrides)
    assert [s["experiment"] for s in summaries] == ["smoke/pspnet_r18_tiny", SMOKE_HL_RUN]
    out = capsys.readouterr().out
    assert "HL AUROC" in out and SMOKE_HL_RUN in out and str(tmp_path) in out
    base, hl = summaries
    for s in summaries:
        rd = Path(s["run_dir"])
        assert rd == tmp_path / "smoke" / (s["experiment"].replace("/", "-") + "-smoke") / "seed0"
        for name in ("config.yaml", "env.json", "summary.json", "checkpoints/iter_000004.pth", "checkpoints/best.pth"):
            assert (rd / name).is_file(), name
        lines = _lines(rd)
        train = [x for x in lines if x["mode"] == "train"]
        assert [x["iter"] for x in train] == [2, 4] and all("decode.loss_ce" in x and "lr" in x for x in train)
        val = [x for x in lines if x["mode"] == "val"]
        assert val[-1]["iter"] == 4 and 0 <= val[-1]["mIoU"] <= 1 and "IoU.pole" in val[-1]
        assert s["final"]["protocol"] == {"mode": "whole", "checkpoint": "final (iter 4)", "network": "student"}
    assert "weight_loss" in _lines(hl["run_dir"])[0] and "weight_loss" not in _lines(base["run_dir"])[0]
    assert 0 <= hl["hl_auroc"] <= 1 and base["hl_auroc"] is None
    assert list((Path(hl["run_dir"]) / "hl_maps").glob("*.png"))


def test_resume_gives_the_same_result_as_an_uninterrupted_run(hydra_ctx, tmp_path, monkeypatch):
    over = TINY + [*SMOKE_HL, "train.iters=6", "train.ckpt_interval=3", "train.num_workers=1"]
    full = run_experiment(compose_run(over, tmp_path / "a")[0], SMOKE_HL_RUN, None, "smoke")
    sigterm_during_step(monkeypatch, 2)  # a step between checkpoints: the stop writes its own
    with pytest.raises(RunStopped, match="SIGTERM at iteration 2") as stopped:
        run_experiment(compose_run(over, tmp_path / "b")[0], SMOKE_HL_RUN, None, "smoke")
    assert stopped.value.exit_code == 75
    resumed = run_experiment(compose_run(over + ["resume=true"], tmp_path / "b")[0], SMOKE_HL_RUN, None, "smoke")
    assert resumed["run_dir"] == str(tmp_path / "b/runs/smoke-pspnet_r18_tiny+hl-smoke/seed0")
    assert resumed["resumed_from"] == 2
    assert resumed["final"]["IoU"] == full["final"]["IoU"]
    a = torch.load(Path(full["run_dir"]) / "checkpoints/iter_000006.pth", weights_only=False)["model"]
    b = torch.load(Path(resumed["run_dir"]) / "checkpoints/iter_000006.pth", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The interrupted run's log lines are kept and the resume point is recorded.
    modes = [x["mode"] for x in _lines(resumed["run_dir"])]
    assert modes.count("train") >= 3 and "resume" in modes


def test_rerun_without_resume_never_overwrites(hydra_ctx, tmp_path):
    over = TINY + ["experiment=smoke/pspnet_r18_tiny", "train.iters=2", "train.log_interval=1"]
    first = run_experiment(compose_run(over, tmp_path)[0], "smoke/pspnet_r18_tiny", None, None)
    before = (Path(first["run_dir"]) / "metrics.jsonl").read_text()
    second = run_experiment(compose_run(over, tmp_path)[0], "smoke/pspnet_r18_tiny", None, None)
    assert Path(second["run_dir"]).name == "seed0-2"
    assert (Path(first["run_dir"]) / "metrics.jsonl").read_text() == before


def test_init_from_loads_weights_only(hydra_ctx, tmp_path, caplog):
    over = TINY + [*SMOKE_HL, "train.iters=2"]
    first = run_experiment(compose_run(over, tmp_path / "a")[0], SMOKE_HL_RUN, None, None)
    ckpt = Path(first["run_dir"]) / "checkpoints/iter_000002.pth"
    with caplog.at_level("INFO"):
        second = run_experiment(compose_run(over + [f"init_from={ckpt}"], tmp_path / "b")[0], SMOKE_HL_RUN, None,
                                None)
    assert second["resumed_from"] is None and second["iters"] == 2
    assert f"tensors from {ckpt}" in caplog.text  # the same loaded / missing / unexpected report as pretrained
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        run_experiment(compose_run(over + ["init_from=/nope.pth"], tmp_path / "c")[0], SMOKE_HL_RUN, None, None)
    state = torch.load(ckpt, weights_only=False)["model"]
    stranger = tmp_path / "stranger.pth"
    torch.save({f"other.{k}": v for k, v in state.items() if k.startswith("backbone.")}, stranger)
    with pytest.raises(BadFileError, match="tensors of .* match"):
        run_experiment(compose_run(over + [f"init_from={stranger}"], tmp_path / "d")[0], SMOKE_HL_RUN, None, None)


def test_paper_experiment_without_its_weights_stops_at_once_with_one_line(tmp_path):
    env = {"HLBENCH_WEIGHTS": ""}
    res = _cli(["experiment=fullsup/pspnet_r101", "hl.enabled=true", "logger=none"], tmp_path, env)
    (line,) = res.stderr.strip().splitlines()
    assert res.returncode == 2 and "resnet101_v1c-e67eebb6.pth" in line and "HLBENCH_WEIGHTS" in line
    assert "hlbench.weights fetch" in line and "model.backbone.pretrained=none" in line
    assert not (tmp_path / "runs").exists()  # nothing started
    res = _cli(["experiment=fullsup/pspnet_r101", "hl.enabled=true", "logger=none", f"weights_dir={tmp_path / 'w'}"],
               tmp_path)
    assert res.returncode == 2 and f"not found in the weights folder {tmp_path / 'w'}" in res.stderr


def test_paper_experiment_starts_from_the_named_file_and_records_it(hydra_ctx, tmp_path):
    from hlbench.models.resnet import ResNetV1c

    name = "resnet101_v1c-e67eebb6.pth"
    # The paper experiment on the CPU-sized smoke profile, but with its ResNet-101 and its named weights file.
    over = TINY + ["experiment=fullsup/pspnet_r101", "hl.enabled=true", "train.iters=2", "model.backbone.depth=101",
                   f"model.backbone.pretrained={name}", f"weights_dir={tmp_path / 'weights'}"]
    (tmp_path / "weights").mkdir()
    torch.save(ResNetV1c(101, width_mult=0.25).state_dict(), tmp_path / "weights" / name)
    summary = run_experiment(compose_run(over, tmp_path)[0], "fullsup/pspnet_r101+hl", None, "smoke")
    assert summary["pretrained"] == name and summary["iters"] == 2
    scratch = run_experiment(compose_run(TINY + [*SMOKE_HL, "train.iters=2"], tmp_path)[0],
                             SMOKE_HL_RUN, None, "smoke")
    assert scratch["pretrained"] == "none"


def test_start_up_line_states_the_per_gpu_grouping(hydra_ctx, tmp_path, caplog):
    over = TINY + ["experiment=fullsup/pspnet_r101", "hl.enabled=true", "train.iters=2"]
    with caplog.at_level("INFO", logger="hlbench"):
        summary = run_experiment(compose_run(over, tmp_path)[0], "fullsup/pspnet_r101+hl", None, "smoke")
    # profile=smoke trains 4 images on one device; the recipe's reference is 4 GPUs x 2.
    assert "reference 4 GPU(s) x 2, device batch 4; HL normaliser over 2 image(s)" in caplog.text
    assert "estimated peak training memory per device" in caplog.text  # printed before the first step
    assert summary["grouping"].startswith("reference 4 GPU(s) x 2") and summary["precision"] == "fp32"
    assert summary["hl_variant"] == "custom"  # global batch 4, not the authors' 8


def test_seed_sweep_reports_mean_std(hydra_ctx, tmp_path, capsys):
    cfg, choices, overrides = compose_run(TINY + ["experiment=smoke/pspnet_r18_tiny", "seeds=[0,1]", "train.iters=2"],
                                          tmp_path)
    summaries = run(cfg, choices, overrides)
    assert [s["seed"] for s in summaries] == [0, 1]
    out = capsys.readouterr().out
    assert "± " in out and "(2)" in out


def _cli(args, tmp_path, env_extra=None, launcher=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env_extra or {})})
    cmd = (launcher or [sys.executable]) + ["-m", "hlbench.run", *args, f"out_dir={tmp_path}"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_multirun_jobs_are_one_finished_wandb_run_each(tmp_path):
    args = ["-m", *SMOKE_HL, "seed=0,1", *[a for a in TINY if a != "logger=none"], "logger=wandb"]
    res = _cli(args, tmp_path, {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                                   "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                                   "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                                   "WANDB_DATA_DIR": str(tmp_path / "wandb-data")})
    assert res.returncode == 0, res.stderr[-2000:]
    for seed in (0, 1):
        rd = tmp_path / "runs" / "smoke-pspnet_r18_tiny+hl-smoke" / f"seed{seed}"
        assert json.loads((rd / "summary.json").read_text())["seed"] == seed
        assert len(list(rd.glob("wandb/offline-run-*"))) == 1 and (rd / "wandb_id.txt").is_file()


def test_ddp_two_processes_with_gloo(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    res = _cli([*SMOKE_HL, *TINY], tmp_path, launcher=launcher)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/smoke-pspnet_r18_tiny+hl-smoke/seed0/summary.json").read_text())
    assert summary["batch"] == {"global": {"labeled": 4}, "per_device": {"labeled": 2}, "accumulation": 1,
                                "world_size": 2}
    assert len(list(tmp_path.glob("runs/*/*"))) == 1


def test_evaluation_cadence_does_not_change_training(hydra_ctx, tmp_path):
    over = TINY + [*SMOKE_HL, "train.iters=4"]
    quiet = run_experiment(compose_run(over + ["train.hl_map_interval=0", "train.eval_interval=0"],
                                       tmp_path / "a")[0], SMOKE_HL_RUN, None, None)
    busy = run_experiment(compose_run(over + ["train.hl_map_interval=1", "train.eval_interval=2"],
                                      tmp_path / "b")[0], SMOKE_HL_RUN, None, None)
    a = torch.load(Path(quiet["run_dir"]) / "checkpoints/iter_000004.pth", weights_only=False)["model"]
    b = torch.load(Path(busy["run_dir"]) / "checkpoints/iter_000004.pth", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("suite", sorted(p.stem for p in (REPO / "experiments" / "suites").glob("*.yaml")))
def test_every_suite_dry_runs_with_profile_smoke(hydra_ctx, tmp_path, suite):
    # Smaller crops and two validation scenes: every cell's code path on its family's tiny model, a quarter faster.
    cfg, choices, overrides = compose_run([f"suite={suite}", "profile=smoke", "logger=none", "data.val.num_images=2",
                                           "data.train_pipeline.crop=[96,96]"], tmp_path)
    summaries = run(cfg, choices, overrides)
    listed = [r.name for r in load_suite(suite).runs]
    # A study with seeds [0, 1, 2] runs each experiment once per seed; none is skipped or run twice.
    assert {s["experiment"] for s in summaries} == set(listed)
    assert all(s["hl"] == s["experiment"].endswith("+hl") for s in summaries)
    assert len({(s["experiment"], s["seed"]) for s in summaries}) == len(summaries)
    assert all(s["data"] == "synthetic" and s["iters"] == 8 for s in summaries)


def test_best_weights_selected_by_another_protocol_are_rescored(hydra_ctx, tmp_path, monkeypatch):
    # U2PL's rule: a centre crop selects best.pth during training, the final protocol scores it at the end.
    import hlbench.engine.trainer as trainer

    real = trainer.evaluate

    def centre_wins(model, dataset, eval_cfg, *args, **kwargs):
        result = real(model, dataset, eval_cfg, *args, **kwargs)
        result["metrics"]["mIoU"] = 0.9 if eval_cfg.mode == "center" else result["metrics"]["mIoU"]
        return result

    monkeypatch.setattr(trainer, "evaluate", centre_wins)
    over = TINY + [*SMOKE_HL, "train.iters=4", "train.eval_interval=2",
                   "eval.during={mode: center, crop: [32, 32], until: 1.0}"]
    summary = run_experiment(compose_run(over, tmp_path / "a")[0], SMOKE_HL_RUN, None, "smoke")
    best, final = summary["best"], summary["final"]
    assert best["iter"] == 2 and best["protocol"]["mode"] == "center" and best["mIoU"] == 0.9
    assert best["rescored"]["protocol"]["mode"] == "whole" and best["rescored"]["mIoU"] < 0.9
    assert final["iter"] == 4 and final["protocol"]["mode"] == "whole"
    modes = [x.get("protocol") for x in _lines(summary["run_dir"]) if x["mode"] == "val"]
    assert modes == ["center", "whole"]  # iteration 2 by the centre crop, the final evaluation by the protocol
    # Only final-protocol evaluations may select when asked: then nothing needs re-scoring.
    strict = run_experiment(compose_run(over + ["eval.select_from=final_protocol"], tmp_path / "b")[0], SMOKE_HL_RUN,
                            None, "smoke")
    assert strict["best"]["iter"] == 4 and "rescored" not in strict["best"]
