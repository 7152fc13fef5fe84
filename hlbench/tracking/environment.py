"""Provenance record of a run: code version, library versions, hardware, command line."""
from __future__ import annotations

import datetime
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch


def _git(*args: str) -> str | None:
    """Output of a git command run in the folder holding the hlbench package; None when that fails."""
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict:
    """{"commit": sha|None, "dirty": bool|None}; dirty counts changes to tracked files only."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def device_names() -> list[str]:
    if not torch.cuda.is_available():
        return ["cpu"]
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def environment_record(extra: dict | None = None) -> dict:
    """Everything needed to say what ran where; `extra` adds engine facts (world size, seeds, effective batch)."""
    try:
        import torchvision
        torchvision_version = torchvision.__version__
    except ImportError:
        torchvision_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    record = {
        "git": git_state(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision_version,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "devices": device_names(),
        "hostname": socket.gethostname(),
        "argv": list(sys.argv),
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    record.update(extra or {})
    return record
