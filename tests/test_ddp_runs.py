"""Two gloo processes: U2PL's contrastive gradient under the reference's all-reduce, a supervised-only U2PL epoch
under DDP, and a run stopped by a signal and resumed, which must equal the uninterrupted run bit for bit (every rank
restores its own RNG and BatchNorm statistics).

All cases run in one launch of 2 processes (their start dominates the cost); the tests read its results.
"""
import os
import signal

import numpy as np
import pytest
import torch
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from hlbench.engine.distributed import all_reduce_mean
from hlbench.errors import RunStopped
from hlbench.methods.u2pl import U2PL, resolve_flags
from tests.conftest import compose_run, free_port, gloo_group, launch_gloo

WORLD = 2
# A tiny U2PL run with its contrastive loss, 2 reference GPUs of 2 + 2 images: one per process.
U2PL_RUN = ["experiment=semisup/u2pl_1_16", "hl.enabled=true", "profile=smoke", "data=synthetic_semisup", "logger=none",
            "data.train.num_images=32", "data.split=null", "data.split_fraction=0.25", "data.pregenerate=false",
            "data.val.num_images=4", "data.val.size=[48,48]", "data.train.size=[48,48]",
            "data.train_pipeline.crop=[48,48]", "train.iters=4", "train.ckpt_interval=2", "train.log_interval=2",
            "train.hl_map_interval=0", "train.eval_interval=0", "train.batch_size=4", "method.unlabeled_batch=4",
            "train.reference.gpus=2", "train.reference.per_gpu=2", "loss.ohem_min_kept=1000",
            "method.contrastive.num_queries=16", "method.contrastive.queue_size=64",
            "method.contrastive.queue_size_class0=64"]
STOP_AT = 2


def _contrastive_case(rank: int) -> dict:
    """Rank r's contrastive loss is (r + 1) * sum(w) over a 3-vector w of ones, weighted as U2PL's step weights
    it under method.behaviour=reference with a 2-GPU reference layout."""
    m = U2PL.__new__(U2PL)
    m.flags, m.reference_gpus = resolve_flags(OmegaConf.create({"behaviour": "reference", "flags": {}})), WORLD
    summed = _Sum()
    ddp = torch.nn.parallel.DistributedDataParallel(summed)  # kept: its reducer does the averaging in backward
    loss_c = (rank + 1) * ddp()
    m.contrastive_term(loss_c).backward()
    # DDP averaged the gradients; the reference's logged value is the GPUs' mean.
    return {"grad": summed.w.grad.clone(), "logged": all_reduce_mean({"c": loss_c.detach()})["c"]}


class _Sum(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self):
        return self.w.sum()


def _stopping_after(after_step, it_to_stop: int):
    """U2PL.after_step that then sends this process a SIGTERM after step `it_to_stop`, as a scheduler would."""
    def stopping(self, model, it):
        after_step(self, model, it)
        if it == it_to_stop:
            os.kill(os.getpid(), signal.SIGTERM)
    return stopping


def _worker(rank, port, out_dir, results_file):
    from hlbench.run import run_experiment

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    with gloo_group(rank, WORLD, port):
        results = {"contrastive": _contrastive_case(rank)}
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="hlbench.conf", version_base="1.3"):
            def run(extra, folder, **kw):
                return run_experiment(compose_run(U2PL_RUN + extra, f"{out_dir}/{folder}")[0],
                                      "semisup/u2pl_1_16+hl", None, "smoke", **kw)

            results["sup_only"] = run(["method.sup_only_epoch=1", "method.epochs=2"], "sup_only")
            results["full"] = run([], "full")
            original = U2PL.after_step
            if rank == 1:  # one rank's signal stops every rank at the end of the step
                U2PL.after_step = _stopping_after(original, STOP_AT)
            try:
                run([], "stopped")
            except RunStopped as err:
                results["stopped"] = err.exit_code
            U2PL.after_step = original
            results["resumed"] = run(["resume=true"], "stopped")
    if rank == 0:
        torch.save(results, results_file)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_runs")
    launch_gloo(_worker, WORLD, (free_port(), str(out), str(out / "results.pt")), ["hlbench.methods.u2pl"])
    return out, torch.load(out / "results.pt", weights_only=False)


@pytest.mark.slow
def test_reference_contrastive_gradient_is_divided_by_the_gpus_and_its_value_is_their_mean(two_processes):
    case = two_processes[1]["contrastive"]
    # Rank r contributes (r + 1) per entry of w: DDP's mean is 1.5, and the reference's non-differentiable
    # all-reduce followed by / 2 halves it; the logged value is the mean of 3 and 6.
    assert torch.equal(case["grad"], torch.full((3,), 1.5 / WORLD))
    assert case["logged"].item() == pytest.approx((3 + 6) / 2)


@pytest.mark.slow
def test_a_supervised_only_epoch_runs_under_ddp(two_processes):
    summary = two_processes[1]["sup_only"]
    assert summary["batch"]["world_size"] == WORLD and summary["iters_per_epoch"] == 2  # epoch 0 of 2 supervised
    state = torch.load(f"{summary['run_dir']}/checkpoints/iter_000004.pth", weights_only=False)
    assert state["iter"] == 4 and len(state["ranks"]) == WORLD


@pytest.mark.slow
def test_a_stopped_and_resumed_two_process_run_equals_the_uninterrupted_one(two_processes):
    results = two_processes[1]
    assert results["stopped"] == 75  # REQUEUE_EXIT after SIGTERM
    full = torch.load(f"{results['full']['run_dir']}/checkpoints/iter_000004.pth", weights_only=False)
    resumed = torch.load(f"{results['resumed']['run_dir']}/checkpoints/iter_000004.pth", weights_only=False)
    assert results["resumed"]["resumed_from"] == STOP_AT
    for key in ("model", "optimizer"):
        assert _equal(full[key], resumed[key]), key
    assert _equal(full["method"], resumed["method"])  # teacher and memory queues
    # Rank 1's RNG and BatchNorm statistics differ from rank 0's and were restored as its own.
    assert not _equal(full["ranks"][0]["rng"]["torch"], full["ranks"][1]["rng"]["torch"])
    assert _equal(full["ranks"], resumed["ranks"])
    assert results["resumed"]["final"]["IoU"] == results["full"]["final"]["IoU"]


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)
    return a == b


def test_a_resume_with_another_world_size_reseeds_each_rank_from_seed_rank_and_iteration(caplog):
    from types import SimpleNamespace

    from hlbench.engine import checkpoint as ckpt
    from hlbench.engine.distributed import DistInfo
    from hlbench.engine.trainer import Trainer

    saved = [{"rng": None, "buffers": None, "method": {}}] * 3  # a checkpoint of 3 processes, resumed by 2
    ranks = []
    for rank in (0, 1):
        trainer = SimpleNamespace(info=DistInfo(rank, rank, 2, torch.device("cpu")),
                                  cfg=OmegaConf.create({"seed": 3}), start_it=7)
        with caplog.at_level("WARNING", logger="hlbench"):
            Trainer._restore_rank(trainer, saved)
        ranks.append(torch.rand(4))
    ckpt.reseed(3, 1, 7)
    assert torch.equal(ranks[1], torch.rand(4)) and not torch.equal(ranks[0], ranks[1])
    assert caplog.text.count("re-seeded from (seed, rank, iteration 7)") == 1  # one line, from rank 0
