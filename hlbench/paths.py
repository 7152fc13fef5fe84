"""Folders hlbench reads that are not part of the package."""
from __future__ import annotations

import os
from pathlib import Path


def experiments_dir() -> Path:
    """experiment/ and suites/: $HLBENCH_EXPERIMENTS_DIR when set, else the experiments/ folder next to the package."""
    explicit = os.environ.get("HLBENCH_EXPERIMENTS_DIR")
    return Path(explicit) if explicit else Path(__file__).resolve().parents[1] / "experiments"
