"""Atomic checkpoints in the run folder and the full training state needed for an exact resume."""
from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from ..atomic_files import atomic_write
from ..models.pretrained import read_torch_file

_ITER_RE = re.compile(r"iter_(\d+)\.pth$")


def atomic_save(obj, path: Path) -> None:
    """torch.save atomically, so a killed job never leaves a truncated checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint with the highest iteration in `ckpt_dir`, or None."""
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("iter_*.pth") if (m := _ITER_RE.search(p.name))]
    return max(found)[1] if found else None


def load_state(path: Path, map_location="cpu") -> dict:
    """A training-state checkpoint (ours: it pickles RNG states, so it is loaded in full)."""
    state = read_torch_file(path, safe_first=False, map_location=map_location)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, got {type(state).__name__}")
    return state
