"""Faults a long run meets, injected for real: pre-emption signals and SIGKILL, unreadable checkpoints, a full disk,
non-finite losses, W&B failures and two jobs racing for one run folder. Each run must lose nothing it computed."""
import errno
import json
import math
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from hlbench.engine.checkpoint import prune_checkpoints
from hlbench.engine.preemption import REQUEUE_EXIT
from hlbench.errors import ConfigError, RunStopped
from hlbench.methods.supervised import Supervised
from hlbench.run import run_dir_for, run_experiment
from hlbench.tracking.run_folder import claimed_run_folder
from tests.conftest import compose_run, offline_records, REPO, sigterm_during_step, SMOKE_HL, SMOKE_HL_RUN, TINY

pytestmark = pytest.mark.slow

# Pre-emption runs: long enough to be stopped mid-way (a step is ~0.05 s here), with periodic checkpoints,
# evaluations (best-so-far) and a loader worker process (which receives the launcher's signals too).
LONG = TINY + [*SMOKE_HL, "train.iters=15", "train.ckpt_interval=3", "train.eval_interval=5",
               "train.log_interval=1", "train.hl_map_interval=0", "train.num_workers=1", "train.keep_checkpoints=0"]
SHORT = TINY + [*SMOKE_HL, "train.iters=6", "train.ckpt_interval=2", "train.keep_checkpoints=0"]


@contextmanager
def _one_thread():
    """In-process runs use one thread, as the CLI runs do (OMP_NUM_THREADS=1): CPU reductions then round alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run(over, out):
    with _one_thread():
        return run_experiment(compose_run(over, out)[0], SMOKE_HL_RUN, None, "smoke")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The LONG run without faults: (summary, final checkpoint)."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="hlbench.conf", version_base="1.3"):
        summary = _run(LONG, tmp_path_factory.mktemp("uninterrupted"))
    GlobalHydra.instance().clear()
    return summary, _load(Path(summary["run_dir"]) / "checkpoints/iter_000015.pth")


def _load(path):
    return torch.load(path, weights_only=False)


def _assert_same(a, b, where="state"):
    """Bit-equal nested state: tensors, arrays, dicts, lists and plain values."""
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _assert_resumed_equals(resumed, uninterrupted):
    """Every piece of the final state equals the uninterrupted run's: model, optimiser, method state, RNG, the
    best-so-far, and the final evaluation."""
    summary, state = uninterrupted
    assert resumed["final"] == summary["final"] and resumed["best"] == summary["best"]
    final = _load(Path(resumed["run_dir"]) / "checkpoints/iter_000015.pth")
    for key in ("model", "optimizer", "method", "ranks", "best", "iter", "skipped_nonfinite"):
        _assert_same(final[key], state[key], key)



def _start(over, out):
    """`python -m hlbench.run` in a session of its own, so that signals can go to all its processes, as SLURM's do;
    its stderr goes to out/stderr.txt."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    with open(Path(out) / "stderr.txt", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "hlbench.run", *over, f"out_dir={out}"], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def _trained(run_dir) -> int:
    """The last iteration with a train line in metrics.jsonl (complete lines only), 0 before the first."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    text = path.read_text()
    lines = text.splitlines()[: text.count("\n")]
    return max((rec["iter"] for rec in map(json.loads, lines) if rec["mode"] == "train"), default=0)


def _stderr(proc) -> str:
    return (Path(proc.args[-1].removeprefix("out_dir=")) / "stderr.txt").read_text()


def _wait_until_trained(proc, run_dir, it: int) -> int:
    deadline = time.monotonic() + 300
    while (done := _trained(run_dir)) < it:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before iteration {it}: {_stderr(proc)[-3000:]}")
        assert time.monotonic() < deadline, f"no iteration {it} after 300 s"
        time.sleep(0.005)
    return done


# 1. Pre-emption


def test_sigkill_at_a_random_iteration_then_resume_equals_an_uninterrupted_run(hydra_ctx, tmp_path, uninterrupted):
    # A fresh kill point each run, from a printed seed: HLBENCH_KILL_SEED=<seed> repeats a failing one.
    seed = int(os.environ.get("HLBENCH_KILL_SEED") or random.SystemRandom().randrange(2 ** 32))
    target = random.Random(seed).randrange(4, 13)  # iteration 3's checkpoint exists once iteration 4 is logged
    print(f"HLBENCH_KILL_SEED={seed}: SIGKILL once iteration {target} is logged")
    proc = _start(LONG, tmp_path)
    run_dir = tmp_path / "runs" / "smoke-pspnet_r18_tiny+hl-smoke" / "seed0"
    seen = _wait_until_trained(proc, run_dir, target)
    os.killpg(proc.pid, signal.SIGKILL)  # the node dies: no handler runs, maybe mid-write
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (run_dir / "summary.json").exists(), (seed, target, seen)
    resumed = _run(LONG + ["resume=true"], tmp_path)  # the killed job's folder lock went with it
    assert resumed["run_dir"] == str(run_dir)
    assert 3 <= resumed["resumed_from"] < 15 and resumed["resumed_from"] % 3 == 0, (seed, target, seen)
    _assert_resumed_equals(resumed, uninterrupted)


# SIGINT: a Ctrl-C, which the terminal sends to every process of the foreground group, loader workers included.
@pytest.mark.parametrize("sig,status", [("SIGTERM", REQUEUE_EXIT), ("SIGUSR1", REQUEUE_EXIT), ("SIGINT", 130)])
def test_stop_signal_checkpoints_the_step_exits_for_requeue_and_resumes_exactly(hydra_ctx, tmp_path, uninterrupted,
                                                                                 sig, status):
    proc = _start(LONG, tmp_path)
    run_dir = tmp_path / "runs" / "smoke-pspnet_r18_tiny+hl-smoke" / "seed0"
    _wait_until_trained(proc, run_dir, 2)
    os.killpg(proc.pid, getattr(signal, sig))  # to the loader worker too, as SLURM signals every process
    proc.wait(timeout=120)
    err = _stderr(proc)
    assert proc.returncode == status, err[-3000:]
    (line,) = [ln for ln in err.splitlines() if ln.startswith("stopped:")]
    assert "Traceback" not in err and sig in line and "resume=true" in line
    stopped_at = int(re.search(r"at iteration (\d+)", line).group(1))
    assert stopped_at < 15 and not (run_dir / "summary.json").exists()
    assert _load(run_dir / f"checkpoints/iter_{stopped_at:06d}.pth")["iter"] == stopped_at
    if sig == "SIGTERM":  # SIGUSR1 takes the same path from here on
        before = _load(run_dir / f"checkpoints/iter_{stopped_at:06d}.pth")["train_time_s"]
        resumed = _run(LONG + ["resume=true"], tmp_path)
        assert resumed["resumed_from"] == stopped_at
        _assert_resumed_equals(resumed, uninterrupted)
        # The summary's training time counts the segment before the stop as well.
        assert resumed["train_time_s"] > before > 0


def test_a_launchers_own_handler_runs_after_the_checkpoint(hydra_ctx, tmp_path):
    # submitit installs a SIGUSR2 handler that requeues the job and exits; it must still run, after the save.
    marker = tmp_path / "requeued.txt"
    script = (f"import signal, sys\n"
              f"def requeue(signum, frame):\n"
              f"    open({str(marker)!r}, 'w').write(signal.Signals(signum).name)\n"
              f"    sys.exit(3)\n"
              f"signal.signal(signal.SIGUSR2, requeue)\n"
              f"sys.argv = ['hlbench.run', *{[*LONG, f'out_dir={tmp_path}']!r}]\n"
              f"from hlbench.run import main\n"
              f"main()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
    run_dir = tmp_path / "runs" / "smoke-pspnet_r18_tiny+hl-smoke" / "seed0"
    _wait_until_trained(proc, run_dir, 2)
    os.killpg(proc.pid, signal.SIGUSR2)
    proc.wait(timeout=120)
    assert proc.returncode == 3 and marker.read_text() == "SIGUSR2", (tmp_path / "stderr.txt").read_text()[-3000:]
    saved = sorted(run_dir.glob("checkpoints/iter_*.pth"))
    stopped_at = _load(saved[-1])["iter"]
    assert _trained(run_dir) <= stopped_at < 15  # the step the signal interrupted was saved before the requeue


# 2. Checkpoints


def test_unreadable_latest_checkpoint_resumes_from_the_one_before_with_a_warning(hydra_ctx, tmp_path, caplog):
    full = _run(SHORT, tmp_path)
    ckpts = Path(full["run_dir"]) / "checkpoints"
    newest = ckpts / "iter_000006.pth"
    written = _load(newest)
    newest.write_bytes(newest.read_bytes()[:4000])  # a copy cut short, a node dead mid-write
    with caplog.at_level("WARNING", logger="hlbench"):
        resumed = _run(SHORT + ["resume=true"], tmp_path)
    # (The run folder's path holds this test's name, "unreadable" included: the warning is matched by its words.)
    (warning,) = [r.getMessage() for r in caplog.records if " is unreadable (" in r.getMessage()]
    assert str(newest) in warning and str(ckpts / "iter_000004.pth") in warning
    assert resumed["resumed_from"] == 4 and resumed["final"] == full["final"]
    _assert_same(_load(newest)["model"], written["model"])  # redone from iteration 4, bit for bit

    for path in ckpts.glob("iter_*.pth"):
        path.write_bytes(b"\x00" * 64)
    before = {p: p.read_bytes() for p in ckpts.iterdir()}
    with pytest.raises(ConfigError, match="no readable checkpoint") as err:
        _run(SHORT + ["resume=true"], tmp_path)
    assert "\n" not in str(err.value) and all(f"iter_00000{k}.pth" in str(err.value) for k in (2, 4, 6))
    assert {p: p.read_bytes() for p in ckpts.iterdir()} == before  # not started over on top of them


def test_keep_last_n_never_removes_best_or_the_newest(tmp_path):
    for it in (2, 4, 6, 8):
        torch.save({"iter": it}, tmp_path / f"iter_{it:06d}.pth")
    (tmp_path / "iter_000012.pth").write_bytes(b"unreadable, passed over by a resume")
    (tmp_path / "best.pth").write_bytes(b"best")
    assert prune_checkpoints(tmp_path, 0, tmp_path / "iter_000008.pth") == []
    removed = prune_checkpoints(tmp_path, 2, tmp_path / "iter_000008.pth")
    assert sorted(p.name for p in removed) == ["iter_000002.pth", "iter_000004.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "iter_000006.pth", "iter_000008.pth",
                                                          "iter_000012.pth"]
    prune_checkpoints(tmp_path, 1, tmp_path / "iter_000008.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "iter_000008.pth", "iter_000012.pth"]


def test_a_run_keeps_its_last_checkpoints_and_best(hydra_ctx, tmp_path):
    summary = _run(TINY + [*SMOKE_HL, "train.iters=8", "train.ckpt_interval=2", "train.eval_interval=2",
                           "train.keep_checkpoints=2"], tmp_path)
    names = sorted(p.name for p in (Path(summary["run_dir"]) / "checkpoints").iterdir())
    assert names == ["best.pth", "iter_000006.pth", "iter_000008.pth"]


def test_full_disk_while_saving_keeps_the_previous_checkpoint_and_stops_in_one_line(hydra_ctx, tmp_path,
                                                                                  monkeypatch):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if Path(f).name.startswith(".iter_000004."):
            Path(f).write_bytes(b"PK\x03\x04 the first bytes")  # what fitted before the disk filled up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(RunStopped) as err:
        _run(SHORT, tmp_path)
    msg, ckpts = str(err.value), tmp_path / "runs" / "smoke-pspnet_r18_tiny+hl-smoke" / "seed0" / "checkpoints"
    assert "\n" not in msg and os.strerror(errno.ENOSPC) in msg
    assert str(ckpts / "iter_000004.pth") in msg and str(ckpts / "iter_000002.pth") in msg
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_000002.pth"]  # no partial file, no temporary
    assert _load(ckpts / "iter_000002.pth")["iter"] == 2
    monkeypatch.undo()
    assert _run(SHORT + ["resume=true"], tmp_path)["resumed_from"] == 2


# 3. Numerical faults


def _poison(monkeypatch, at: dict, inputs: bool = False):
    """Make the decode loss (or, with `inputs`, the images) of the given 1-based iterations x * value."""
    real = Supervised.step

    def step(self, model, batches, it):
        bad = at.get(it + 1)
        if bad is not None and inputs:
            batches = {"labeled": {**batches["labeled"], "img": batches["labeled"]["img"] * bad}}
        loss, logs = real(self, model, batches, it)
        if bad is not None and not inputs:
            loss = loss + logs["decode.loss_ce"] * bad
            logs = {**logs, "decode.loss_ce": logs["decode.loss_ce"] * bad, "loss": loss.detach()}
        return loss, logs

    monkeypatch.setattr(Supervised, "step", step)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_loss_stops_naming_iteration_and_term_keeping_the_last_good_checkpoint(hydra_ctx, tmp_path,
                                                                                        monkeypatch, value):
    _poison(monkeypatch, {3: value})
    with pytest.raises(RunStopped) as err:
        _run(TINY + [*SMOKE_HL, "train.iters=8", "train.ckpt_interval=2", "train.log_interval=4"],
             tmp_path)
    msg, ckpts = str(err.value), tmp_path / "runs" / "smoke-pspnet_r18_tiny+hl-smoke" / "seed0" / "checkpoints"
    assert "\n" not in msg and "at iteration 3 " in msg and f"decode.loss_ce={value}" in msg
    assert "aux.loss_ce" not in msg  # only the terms that went bad are named
    assert str(ckpts / "iter_000002.pth") in msg
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_000002.pth"]  # iteration 4's weights came after it
    assert all(torch.isfinite(v).all() for v in _load(ckpts / "iter_000002.pth")["model"].values()
               if v.is_floating_point())


def test_skip_nonfinite_skips_the_update_and_counts_it(hydra_ctx, tmp_path, monkeypatch):
    _poison(monkeypatch, {3: math.nan, 5: math.inf})
    summary = _run(TINY + [*SMOKE_HL, "train.iters=6", "train.ckpt_interval=1", "train.skip_nonfinite=2",
                           "train.keep_checkpoints=0"], tmp_path)
    assert summary["skipped_nonfinite"] == {"count": 2, "iters": [3, 5]}
    state = {it: _load(Path(summary["run_dir"]) / f"checkpoints/iter_{it:06d}.pth") for it in (2, 3, 4)}
    # No optimiser update in iteration 3: weights and momentum as after iteration 2 (BN statistics did move: the
    # forward ran); iteration 4 updates again.
    weights = [k for k in state[2]["model"] if "running_" not in k and "num_batches" not in k]
    _assert_same(state[3]["optimizer"]["state"], state[2]["optimizer"]["state"])
    assert all(torch.equal(state[3]["model"][k], state[2]["model"][k]) for k in weights)
    assert not all(torch.equal(state[4]["model"][k], state[3]["model"][k]) for k in weights)
    assert state[4]["skipped_nonfinite"] == [3]  # a resumed run goes on counting
    assert all(torch.isfinite(v).all() for v in state[4]["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("case", ["over_the_limit", "state_reached"])
def test_skip_nonfinite_stops_when_skipping_cannot_help(hydra_ctx, tmp_path, monkeypatch, case):
    if case == "over_the_limit":
        _poison(monkeypatch, {3: math.nan, 5: math.nan})
        expected = r"at iteration 5 \(decode.loss_ce=nan, loss=nan\): more than train.skip_nonfinite=1 steps " \
                   r"skipped \(iterations \[3, 5\]\); the last good checkpoint is .*iter_000004.pth$"
    else:  # NaN pixels: the forward itself puts NaN into the BatchNorm running statistics
        _poison(monkeypatch, {3: math.nan}, inputs=True)
        expected = r"at iteration 3 .* reached the BatchNorm statistics.*; the last good checkpoint is .*iter_000002.pth$"
    with pytest.raises(RunStopped, match=expected):
        _run(TINY + [*SMOKE_HL, "train.iters=6", "train.ckpt_interval=2", "train.skip_nonfinite=1"],
             tmp_path)


# 6. Tracking faults


def _raise(*args, **kwargs):
    raise ConnectionError("injected: W&B unreachable")


@pytest.mark.parametrize("where", ["init", "log", "finish"])
def test_wandb_failures_never_stop_training_or_the_run_folder(hydra_ctx, wandb_offline, tmp_path, monkeypatch,
                                                             caplog, where):
    from wandb.sdk.wandb_run import Run

    with monkeypatch.context() as patch, caplog.at_level("WARNING", logger="hlbench.tracking.tracker"):
        patch.setattr(*((wandb_offline, "init") if where == "init" else (Run, where)), _raise)
        summary = _run(TINY + [*SMOKE_HL, "logger=wandb"], tmp_path)
    run_dir = Path(summary["run_dir"])
    warnings = [r.getMessage() for r in caplog.records if r.name == "hlbench.tracking.tracker"]
    assert len(warnings) == 1 and "injected: W&B unreachable" in warnings[0], warnings
    for name in ("config.yaml", "env.json", "summary.json", "checkpoints/iter_000004.pth", "checkpoints/best.pth"):
        assert (run_dir / name).is_file(), name
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(x["mode"], x["iter"]) for x in lines] == [("train", 2), ("train", 4), ("val", 4)]
    assert json.loads((run_dir / "summary.json").read_text())["final"] == summary["final"]


def test_a_resumed_run_adds_an_offline_segment_and_w_and_b_reads_both(hydra_ctx, wandb_offline, tmp_path,
                                                                    monkeypatch):
    over = TINY + [*SMOKE_HL, "logger=wandb"]
    sigterm_during_step(monkeypatch, 2)
    with pytest.raises(RunStopped):
        _run(over, tmp_path)
    run_dir = tmp_path / "runs" / "smoke-pspnet_r18_tiny+hl-smoke" / "seed0"
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    (first,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}*")
    first_files = {p: p.read_bytes() for p in first.rglob("*") if p.is_file() and p.suffix == ".wandb"}
    _run(over + ["resume=true"], tmp_path)
    segments = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(segments) == 2 and first in segments
    assert {p: p.read_bytes() for p in first_files} == first_files  # the first segment is untouched
    steps = []
    for segment in segments:
        records = offline_records(segment)  # W&B's own reader: what `wandb sync` uploads
        assert [r["run"]["run_id"] for r in records if r["type"] == "run"] == [run_id]
        steps.append({r["history"]["item"]["_step"] for r in records if r["type"] == "history"})
    assert steps[segments.index(first)] == {2} and steps[1 - segments.index(first)] == {4}
    res = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", *map(str, segments)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "Would sync 2 run(s)" in res.stdout + res.stderr


# 7. Runs folder


def _claim_and_write(out: str, base: str, barrier, results) -> None:
    cfg = OmegaConf.create({"out_dir": out, "resume": False})
    names = iter([Path(base)])  # both jobs named the folder before either created it
    barrier.wait()
    with claimed_run_folder(lambda: next(names, None) or run_dir_for(cfg, SMOKE_HL_RUN, None, None, 0), False) as path:
        (path / f"written-by-{os.getpid()}").write_text("x")
        time.sleep(0.2)
    results.put(str(path))


def test_two_jobs_racing_for_one_run_folder_get_one_each(tmp_path):
    cfg = OmegaConf.create({"out_dir": str(tmp_path), "resume": False})
    base = run_dir_for(cfg, SMOKE_HL_RUN, None, None, 0)
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    jobs = [ctx.Process(target=_claim_and_write, args=(str(tmp_path), str(base), barrier, results)) for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(60)
    assert [job.exitcode for job in jobs] == [0, 0]
    folders = sorted(Path(results.get(timeout=5)) for _ in jobs)
    assert folders == [base, base.with_name("seed0-2")]
    assert all(len(list(f.glob("written-by-*"))) == 1 for f in folders)


def test_a_resume_cannot_enter_a_run_folder_in_use_and_a_failed_start_leaves_none(tmp_path):
    folder = tmp_path / "runs" / "x" / "seed0"
    with claimed_run_folder(lambda: folder, True):
        (folder / "metrics.jsonl").write_text("")
        with pytest.raises(ConfigError, match=re.escape(f"{folder} is in use by pid {os.getpid()} on ")):
            with claimed_run_folder(lambda: folder, True):
                pass
    with claimed_run_folder(lambda: folder, True):  # free again once its holder is done
        pass
    with pytest.raises(ValueError, match="bad data root"):
        with claimed_run_folder(lambda: tmp_path / "out" / "runs" / "y" / "seed0", False):
            raise ValueError("bad data root")
    assert not (tmp_path / "out" / "runs").exists()
