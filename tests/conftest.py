"""Shared fixtures: compose real configs through Hydra's compose API, shrunk for CPU tests, W&B off."""
import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from hlbench.compose import compose, hydra_context


# One intra-op thread per xdist worker (`make test` runs `-n auto`): each worker is a process, and their OpenMP pools
# together would oversubscribe the cores, which makes CPU training several times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
# Small enough for seconds per run on 2 cores, large enough to exercise every code path.
TINY = ["profile=smoke", "logger=none", "train.iters=4", "train.ckpt_interval=2", "train.log_interval=2",
        "train.hl_map_interval=2", "data.train.num_images=16", "data.val.num_images=4", "data.val.size=[64,64]",
        "data.train.size=[80,80]", "data.train_pipeline.resize.scale=[80,80]", "data.train_pipeline.crop=[64,64]"]
# The smoke suite's HL row (its experiment with hl.enabled=true) and that run's name.
SMOKE_HL = ["experiment=smoke/pspnet_r18_tiny", "hl.enabled=true"]
SMOKE_HL_RUN = "smoke/pspnet_r18_tiny+hl"


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "disabled"))
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))


@pytest.fixture
def hydra_ctx():
    GlobalHydra.instance().clear()
    with hydra_context():
        yield
    GlobalHydra.instance().clear()


def compose_run(overrides, out_dir=None):
    """Compose like the CLI does; returns (cfg without the hydra node, runtime choices, overrides)."""
    overrides = list(overrides) + ([f"out_dir={out_dir}"] if out_dir else [])
    full = compose(overrides, return_hydra_config=True)
    choices = OmegaConf.to_container(full.hydra.runtime.choices)
    with open_dict(full):
        del full["hydra"]
    return full, choices, overrides


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # default: the wandb/ folder lives in the run folder
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    yield wandb
    wandb.teardown()  # W&B reads settings once per process


def offline_records(offline_dir) -> list[dict]:
    """The records of an offline run's .wandb file, as `wandb leet inspect --json` prints them."""
    res = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(offline_dir)],
                         capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gloo_group(rank: int, world: int, port: int):
    """This spawned process as `rank` of a gloo group of `world` on localhost, one thread, for the block."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A bounded timeout: a rank that dies before the rendezvous must not leave the others waiting 30 minutes.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        yield
    finally:
        dist.destroy_process_group()


def sigterm_during_step(monkeypatch, step: int):
    """Stop a run as a scheduler pre-empts a job: this process receives SIGTERM while training step `step`
    (1-based); the loop finishes the step, checkpoints it and raises RunStopped (exit status 75)."""
    import signal

    import hlbench.engine.trainer as trainer

    lr_at = trainer.lr_at

    def signalling(it, *args, **kwargs):  # called as iteration `it` (0-based) starts
        if it == step - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return lr_at(it, *args, **kwargs)

    monkeypatch.setattr(trainer, "lr_at", signalling)


def launch_gloo(worker, nprocs: int, args: tuple, preload: list[str]) -> None:
    """worker(rank, *args) in `nprocs` processes, each with one OpenMP thread (more processes than cores crawl
    oversubscribed). A fork server imports `preload` (installed modules only: Python 3.11's fork server does not get
    the parent's sys.path) once for all ranks and forks them from a clean single-threaded process; spawn would
    import torch and hlbench once per rank, ~6 s each on 2 cores."""
    import torch.multiprocessing as mp

    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.get_context("forkserver").set_forkserver_preload(["torch.distributed", "hydra", *preload])
        mp.start_processes(worker, args=args, nprocs=nprocs, join=True, start_method="forkserver")
    finally:
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = threads
