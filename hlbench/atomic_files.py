"""Atomic file writes: every output (checkpoint, JSON, YAML, PNG) appears whole or not at all."""
from __future__ import annotations

import os
import uuid
from pathlib import Path


def atomic_write(path: str | Path, write) -> Path:
    """Call `write(tmp)` on a fresh temporary path in `path`'s folder, then rename it to `path`.

    The rename is atomic on one file system, so readers never see half a file and a killed job never leaves a
    truncated one; the temporary file keeps `path`'s suffix (image writers pick the format from it) and is
    removed when writing fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
