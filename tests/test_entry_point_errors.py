"""What the command lines report: the project's input errors as one `error:` line with exit status 2, any other
exception (a fault of ours) with its traceback; and a trained run rebuilt for scoring with its own HL head."""
import json
import logging
import sys

import pytest
import torch
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import hlbench.engine.run_parts
import hlbench.models.build
from hlbench.data.synthetic import CLASSES
from hlbench.errors import ConfigError
from hlbench.models import build_model
from hlbench.models.heads import ProjectedHead
from tests.conftest import compose_run, SMOKE_HL, TINY

LIGHT = [*TINY, *SMOKE_HL, "hl.head_channels=4"]


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    """cli(module, args) -> (exit status, stderr) of `python -m <module> <args> out_dir=<tmp>`, run in this process."""
    monkeypatch.delenv("HLBENCH_TRACEBACK", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)  # Hydra prints the trace and exits 1 instead of raising
    handlers = logging.root.handlers[:]  # the entry points reconfigure logging for the whole process

    def call(module, args):
        GlobalHydra.instance().clear()
        monkeypatch.setattr(sys, "argv", [module, *args, f"out_dir={tmp_path}"])
        try:
            __import__(module, fromlist=["main"]).main()
            status = 0
        except SystemExit as exit_:
            status = exit_.code
        return status, capsys.readouterr().err

    yield call
    GlobalHydra.instance().clear()
    logging.root.handlers[:] = handlers


def _raise_internal(*args, **kwargs):
    raise ValueError("an internal fault deep in the code")


def test_an_internal_value_error_in_a_run_keeps_its_traceback(cli, monkeypatch):
    monkeypatch.setattr(hlbench.engine.run_parts, "build_model", _raise_internal)
    status, err = cli("hlbench.run", [*TINY, *SMOKE_HL])
    assert status not in (0, 2)
    assert "Traceback" in err and "ValueError: an internal fault deep in the code" in err
    assert "error: an internal fault" not in err


def test_a_ctrl_c_outside_the_training_steps_is_one_line_with_status_130(cli, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(hlbench.engine.run_parts, "build_model", interrupted)  # while the run is being built
    status, err = cli("hlbench.run", [*TINY, *SMOKE_HL])
    assert status == 130 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("stopped:")] == [
        "stopped: Ctrl-C outside a training step: no checkpoint written; resume=true continues from the newest one"]


def test_an_internal_value_error_in_eval_keeps_its_traceback(cli, monkeypatch, tmp_path):
    monkeypatch.setattr(hlbench.models.build, "build_model", _raise_internal)
    status, err = cli("hlbench.eval", [*TINY, *SMOKE_HL, f"checkpoint={tmp_path / 'w.pth'}"])
    assert status not in (0, 2)
    assert "Traceback" in err and "ValueError: an internal fault deep in the code" in err


def test_a_bad_config_value_found_deep_in_a_run_is_one_line(cli):
    status, err = cli("hlbench.run", [*TINY, *SMOKE_HL, "data.name=nosuch"])
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]  # the rest are INFO log lines
    assert status == 2 and "Traceback" not in err
    assert line.startswith("error: data.name='nosuch' is not a known data set") and "synthetic" in line


def _light_run(tmp_path, with_hl=True):
    """A light-head HL run folder as training leaves it: config.yaml and one checkpoint (without the HL head's
    tensors for with_hl=False)."""
    cfg = compose_run(LIGHT, tmp_path)[0]
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / "config.yaml")
    torch.manual_seed(0)
    model = build_model(OmegaConf.merge(cfg.model, {"backbone": {"pretrained": "none"}}), len(CLASSES), cfg.hl)
    state = {k: v for k, v in model.state_dict().items() if with_hl or not k.startswith("hl_head.")}
    torch.save({"model": state}, run_dir / "checkpoints" / "iter_000004.pth")
    return run_dir, model


def test_the_study_rebuilds_a_light_head_run_with_its_light_head(hydra_ctx, tmp_path, monkeypatch):
    import hlbench.engine.evaluator
    from analysis.hl_study import stratified_scores

    run_dir, trained = _light_run(tmp_path)
    scored = []
    evaluate = hlbench.engine.evaluator.evaluate

    def recording(model, *args, **kwargs):
        scored.append(model)
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(hlbench.engine.evaluator, "evaluate", recording)
    stratified_scores(run_dir)
    model = scored[0]
    assert isinstance(model.hl_head, ProjectedHead) and model.hl_head.channels == 4
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_the_study_refuses_a_checkpoint_that_lacks_the_runs_tensors(hydra_ctx, tmp_path):
    from analysis.hl_study import stratified_scores

    run_dir, _ = _light_run(tmp_path, with_hl=False)
    with pytest.raises(ConfigError, match=r"iter_000004\.pth: \d+ of the model's tensors are not in it \(e\.g\. "
                                          r"hl_head\.") as err:
        stratified_scores(run_dir)
    assert "\n" not in str(err.value)


def test_eval_rebuilds_a_light_head_run_and_refuses_a_checkpoint_missing_tensors(tmp_path, cli):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="hlbench.conf", version_base="1.3"):
        run_dir, _ = _light_run(tmp_path)
        baseline_dir, _ = _light_run(tmp_path / "b", with_hl=False)
    status, err = cli("hlbench.eval", [f"run={run_dir}"])  # the model from the run's own config.yaml
    assert status == 0, err[-2000:]
    (metrics,) = (tmp_path / "eval").glob("*/iter_000004/metrics.json")
    saved = json.loads(metrics.read_text())
    assert saved["weights"]["missing"] == [] and saved["hl_auroc"] is not None

    partial = baseline_dir / "checkpoints" / "iter_000004.pth"
    status, err = cli("hlbench.eval", [*LIGHT, f"checkpoint={partial}"])
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert status == 2 and "Traceback" not in err
    assert line.startswith(f"error: {partial}: ") and "of the model's tensors are not in it" in line
