"""Atomic file writes: every output (checkpoint, JSON, YAML, PNG) appears whole or not at all."""
from __future__ import annotations

import os
import uuid
from pathlib import Path


def atomic_write(path: str | Path, write) -> Path:
    """Call `write(tmp)` on a fresh temporary path in `path`'s folder, then rename it to `path`.

    The rename is atomic on one file system, so readers never see half a file and a killed job never leaves a
    truncated one; the data is flushed to disk before the rename and the rename before returning, so a node that
    loses power leaves the old file or the new one, not an empty one. The temporary file keeps `path`'s suffix
    (image writers pick the format from it) and is removed when writing fails (a full disk gets its space back).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        _fsync(path.parent)  # makes the rename itself durable
    except OSError:  # folders cannot be opened on Windows, nor synced on some file systems; the rename stands
        pass
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
