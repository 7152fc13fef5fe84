"""The method interface: a method's own streams, state, eval weights and lr groups, driven by the shared loop."""
import copy
from pathlib import Path

import pytest
import torch

from hlbench.errors import RunStopped
from hlbench.methods import METHODS, Stream, Supervised
from hlbench.run import run_experiment
from tests.conftest import compose_run, sigterm_during_step, SMOKE_HL, SMOKE_HL_RUN, TINY

pytestmark = pytest.mark.slow


class EmaTeacher(Supervised):
    """Supervised plus what semi-supervised methods need: a second stream, an EMA teacher, counters."""

    name = "ema_teacher"

    def streams(self, datasets):
        return {**super().streams(datasets), "extra": Stream(datasets["train"], 2, key="method.extra_batch")}

    def setup(self, model, plan):
        super().setup(model, plan)
        self.teacher = copy.deepcopy(model).eval()
        self.steps, self.extra_images = 0, 0

    def step(self, model, batches, it):
        self.extra_images += batches["extra"]["img"].shape[0]
        return super().step(model, batches, it)

    @torch.no_grad()
    def after_step(self, model, it):
        self.steps += 1
        for t, s in zip(self.teacher.state_dict().values(), model.state_dict().values()):
            if t.dtype.is_floating_point:
                t.mul_(0.5).add_(s, alpha=0.5)

    def eval_model(self, model):
        return self.teacher, "teacher"

    def state_dict(self):
        return {"teacher": self.teacher.state_dict(), "steps": self.steps, "extra_images": self.extra_images}

    def load_state_dict(self, state):
        self.teacher.load_state_dict(state["teacher"])
        self.steps, self.extra_images = state["steps"], state["extra_images"]


@pytest.fixture
def ema_method(monkeypatch):
    monkeypatch.setitem(METHODS, "ema_teacher", EmaTeacher)


def _over(*extra):
    return TINY + [*SMOKE_HL, "method.name=ema_teacher", "train.iters=4", "train.ckpt_interval=2",
                   *extra]


def test_method_state_is_checkpointed_and_restored(hydra_ctx, tmp_path, ema_method, monkeypatch):
    full = run_experiment(compose_run(_over(), tmp_path / "a")[0], SMOKE_HL_RUN, None, "smoke")
    sigterm_during_step(monkeypatch, 2)
    with pytest.raises(RunStopped):
        run_experiment(compose_run(_over(), tmp_path / "b")[0], SMOKE_HL_RUN, None, "smoke")
    stopped = tmp_path / "b/runs/smoke-pspnet_r18_tiny+hl-smoke/seed0"
    state = torch.load(stopped / "checkpoints/iter_000002.pth", weights_only=False)["method"]
    assert state["steps"] == 2 and state["extra_images"] == 4  # 2 iterations x 1 micro-batch x 2 images
    resumed = run_experiment(compose_run(_over("resume=true"), tmp_path / "b")[0], SMOKE_HL_RUN, None, "smoke")
    a = torch.load(Path(full["run_dir"]) / "checkpoints/iter_000004.pth", weights_only=False)["method"]
    b = torch.load(Path(resumed["run_dir"]) / "checkpoints/iter_000004.pth", weights_only=False)["method"]
    assert a["steps"] == b["steps"] == 4 and a["extra_images"] == b["extra_images"] == 8
    assert all(torch.equal(a["teacher"][k], b["teacher"][k]) for k in a["teacher"])
    assert resumed["final"]["IoU"] == full["final"]["IoU"]


def test_reported_numbers_name_the_network_that_produced_them(hydra_ctx, tmp_path, ema_method):
    # No periodic evaluation: the final one, at iteration 4, is the only one, so best.pth holds the final weights.
    summary = run_experiment(compose_run(_over("train.eval_interval=0"), tmp_path)[0], SMOKE_HL_RUN, None, "smoke")
    assert summary["final"]["protocol"]["network"] == "teacher" and summary["best"]["protocol"]["network"] == "teacher"
    best = torch.load(Path(summary["run_dir"]) / "checkpoints/best.pth", weights_only=False)
    final = torch.load(Path(summary["run_dir"]) / "checkpoints/iter_000004.pth", weights_only=False)
    assert best["network"] == "teacher" and best["iter"] == 4
    assert best["model"].keys() == final["method"]["teacher"].keys()
    assert all(torch.equal(best["model"][k], final["method"]["teacher"][k]) for k in best["model"])
    assert summary["batch"]["per_device"] == {"labeled": 4, "extra": 2}


def test_streams_share_the_accumulation_plan(hydra_ctx, tmp_path, ema_method):
    summary = run_experiment(compose_run(_over("train.max_batch_per_device=2", "train.iters=2"), tmp_path)[0],
                             SMOKE_HL_RUN, None, "smoke")
    assert summary["batch"]["accumulation"] == 2 and summary["batch"]["per_device"] == {"labeled": 2, "extra": 1}
