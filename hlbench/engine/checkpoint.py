"""Atomic checkpoints in the run folder and the full training state needed for an exact resume."""
from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..atomic_files import atomic_write
from ..errors import BadFileError, ConfigError, RunStopped
from ..models.pretrained import read_torch_file

log = logging.getLogger("hlbench")

_ITER_RE = re.compile(r"iter_(\d+)\.pth$")


class Checkpoints:
    """A run's checkpoints/ folder: full training states iter_<k>.pth (the newest train.keep_checkpoints kept) and
    best.pth, written atomically, and the last good one, which every fault message names."""

    def __init__(self, folder: Path, keep: int):
        self.folder, self.keep = Path(folder), keep
        self.last_saved: Path | None = None  # the newest state this run wrote or resumed from

    @property
    def best_path(self) -> Path:
        return self.folder / "best.pth"

    def path(self, it: int) -> Path:
        return self.folder / f"iter_{it:06d}.pth"

    def last_good(self) -> str:
        return (f"the last good checkpoint is {self.last_saved}" if self.last_saved
                else "no checkpoint was written before it")

    def latest(self) -> dict | None:
        """The newest readable training state (latest_valid_state), or None."""
        found = latest_valid_state(self.folder)
        if found is None:
            return None
        self.last_saved, state = found
        return state

    def save(self, it: int, state: dict) -> Path:
        """Write the training state after `it` iterations, then prune the older ones."""
        path = self.path(it)
        self.write(state, path)
        self.last_saved = path
        prune_checkpoints(self.folder, self.keep, path)
        return path

    def write(self, state: dict, path: Path) -> None:
        """atomic_save; a failed write (full disk, quota, I/O error) leaves the earlier files as they were and stops
        the run in one line saying so."""
        try:
            atomic_save(state, path)
        except (OSError, RuntimeError) as err:  # torch.save reports a short write as a RuntimeError
            free = shutil.disk_usage(path.parent).free / 2**20
            raise RunStopped(f"could not write {path} ({type(err).__name__}: {err}; {free:.0f} MiB free there); the "
                             f"files already there are unchanged ({self.last_good()}); free space, then "
                             f"resume=true") from err


def atomic_save(obj, path: Path) -> None:
    """torch.save atomically, so a killed job never leaves a truncated checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def rng_state(device: torch.device) -> dict:
    """This process's random generators: Python, NumPy, torch's CPU one and its own device's."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        if isinstance(state["cuda"], list):  # checkpoints before per-rank states held every device's
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.set_rng_state(state["cuda"], device)


def reseed(seed: int, rank: int, it: int) -> None:
    """Seed every generator of this rank from (seed, rank, iteration): a resume whose saved per-rank states do not
    fit the world size still gives each rank its own, reproducible stream."""
    derived = int(np.random.SeedSequence([seed, rank, it]).generate_state(1)[0])
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)  # and every CUDA device's


def rank_states(state: dict) -> list[dict]:
    """A checkpoint's per-rank states, [{"rng", "buffers", "method"}] in rank order; a checkpoint written before
    they were saved per rank holds rank 0's RNG only."""
    return state["ranks"] if "ranks" in state else [{"rng": state["rng"], "buffers": None, "method": {}}]


def gather_rank_states(state: dict, group) -> list[dict] | None:
    """Every rank's `state` (CPU tensors) in rank order on rank 0, None on the others; [state] in one process
    (group from distributed.host_group())."""
    if group is None:
        return [state]
    gathered = [None] * dist.get_world_size(group) if dist.get_rank(group) == 0 else None
    dist.gather_object(state, gathered, dst=0, group=group)
    return gathered


def _by_iteration(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """The iter_<k>.pth checkpoints of `ckpt_dir`, newest first."""
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("iter_*.pth") if (m := _ITER_RE.search(p.name))]
    return sorted(found, reverse=True)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint with the highest iteration in `ckpt_dir`, or None."""
    found = _by_iteration(ckpt_dir)
    return found[0][1] if found else None


def latest_valid_state(ckpt_dir: Path, required=("model", "optimizer", "iter")) -> tuple[Path, dict] | None:
    """(path, state) of the newest checkpoint that loads and holds the `required` keys, or None when there is none.

    A node that died mid-write or a copy cut short leaves an unreadable newest file; the one before it is used,
    with a warning naming both. When every checkpoint is unreadable, a ConfigError lists them: starting over
    would bury the run's history under a fresh one.
    """
    bad = []
    for _, path in _by_iteration(ckpt_dir):
        try:
            state = load_state(path)
            if missing := [k for k in required if k not in state] + ([] if {"ranks", "rng"} & set(state) else ["ranks"]):
                raise BadFileError(f"{path}: a checkpoint without {missing}")
        except BadFileError as err:
            bad.append((path, err))
            continue
        for unreadable, err in bad:
            log.warning("checkpoint %s is unreadable (%s); resuming from %s instead", unreadable,
                        str(err).removeprefix(f"{unreadable}: "), path)
        return path, state
    if bad:
        raise ConfigError(f"resume=true: no readable checkpoint in {ckpt_dir}: "
                          + "; ".join(str(err) for _, err in bad))
    return None


def prune_checkpoints(ckpt_dir: Path, keep: int, newest: Path) -> list[Path]:
    """Delete all but the `keep` newest iter_<k>.pth up to `newest` (just written, so the newest valid one: always
    kept); returns the deleted paths. best.pth is another name and never touched; keep=0 keeps everything.

    Files numbered after `newest` are not counted: they are the unreadable ones a resume passed over, and go
    once the run has passed their iteration.
    """
    if keep <= 0:
        return []
    last = int(_ITER_RE.search(newest.name).group(1))
    older = [path for it, path in _by_iteration(ckpt_dir) if it < last]
    doomed = older[keep - 1:]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def load_state(path: Path, map_location="cpu") -> dict:
    """A training-state checkpoint (ours: it pickles RNG states, so it is loaded in full)."""
    state = read_torch_file(path, safe_first=False, map_location=map_location)
    if not isinstance(state, dict):
        raise BadFileError(f"{path}: expected a checkpoint dict, got {type(state).__name__}")
    return state
