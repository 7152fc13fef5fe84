"""Run-folder file helpers: atomic JSON/YAML/text writes, the append-only metrics.jsonl, readers."""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import yaml

from hlbench.atomic_files import atomic_write
from hlbench.errors import BadFileError, ConfigError, MissingInputError

LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
RESUME_MODE = "resume"  # metrics.jsonl marker line {"mode": "resume", "iter": R}: later lines supersede iter > R


def to_plain(obj):
    """JSON/YAML-safe copy: DictConfig/mappings -> dict, tensors/numpy scalars -> numbers, NaN/inf -> None.

    NaN becomes null because strict JSON has no NaN token (mmseg log.json files contain none either).
    """
    if type(obj).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf
        return to_plain(OmegaConf.to_container(obj, resolve=True))
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays/scalars and torch tensors
        return to_plain(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def flatten(d: Mapping, sep: str = ".", prefix: str = "") -> dict:
    """{"final": {"mIoU": x}} -> {"final.mIoU": x} (nested mappings only; lists stay values)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, sep, key))
        else:
            out[key] = v
    return out


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically, so readers never see half a file."""
    def write(tmp):
        # a fresh name per write (not mkstemp, whose 0600 mode would stick to the final file)
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, write)


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(to_plain(obj), indent=2) + "\n")


def atomic_write_yaml(path: str | Path, obj) -> Path:
    return atomic_write_text(path, yaml.safe_dump(to_plain(obj), sort_keys=False))


def write_config(run_dir: str | Path, config) -> Path:
    """Write the resolved config to run_dir/config.yaml."""
    return atomic_write_yaml(Path(run_dir) / CONFIG_FILE, config)


def append_jsonl(path: str | Path, record: Mapping) -> None:
    """Append one JSON line; a previous crash's unterminated last line is closed first so lines never merge."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(to_plain(record)) + "\n"
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: file not found")
    return path


def read_json(path: str | Path):
    path = _existing_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BadFileError(f"{path}: not valid JSON ({e})") from None


def read_yaml(path: str | Path):
    return yaml.safe_load(_existing_file(path).read_text(encoding="utf-8"))


def read_jsonl(path: str | Path) -> list[dict]:
    """All JSON lines of `path` in file order; a line cut short by a crash is skipped with a warning."""
    path = _existing_file(path)
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{n}: skipping a line that is not valid JSON (interrupted write?)")
    return records


def current_metrics(records: list[dict]) -> list[dict]:
    """The lines that still count after resumes: per (mode, iter) the last one, resume markers applied.

    A resume marker at iteration R means the run restarted from its checkpoint at R, so earlier lines with
    iter > R belong to the abandoned attempt; they stay in the file (append-only) but not in the result.
    """
    kept: dict[tuple[str, int], dict] = {}
    for rec in records:
        if rec.get("mode") == RESUME_MODE:
            kept = {key: r for key, r in kept.items() if key[1] <= rec["iter"]}
            continue
        key = (rec.get("mode"), rec.get("iter"))
        kept.pop(key, None)  # re-insert so dict order follows the surviving line's position
        kept[key] = rec
    return list(kept.values())


@contextmanager
def claimed_run_folder(next_path, resume: bool):
    """The run folder `next_path()` names, created and locked for this process while the block runs.

    A fresh run creates its folder with one exclusive mkdir: of two jobs starting together one gets it and the
    other asks `next_path()` again (which then names the next version). resume=true takes the existing folder;
    the lock keeps out a second job. A run that failed before its first metrics line or checkpoint (at start)
    leaves no folder behind, so the next attempt gets this name again; a folder it did not create is kept.
    """
    while True:
        path = Path(next_path())
        if resume and path.exists():
            created = False
            break
        try:
            path.mkdir(parents=True)
            created = True
            break
        except FileExistsError:
            continue
    with _locked(path) as lock:
        try:
            yield path
        except BaseException:
            if created and not (path / METRICS_FILE).exists() and not (path / "checkpoints").exists():
                for child in path.iterdir():  # config.yaml, env.json, an empty W&B segment: no results
                    if child.is_dir():
                        shutil.rmtree(child)
                    elif child.name != LOCK_FILE:
                        child.unlink()
            raise
        finally:
            if [p.name for p in path.iterdir()] == [LOCK_FILE]:
                lock.unlink()
                for folder in (path, path.parent, path.parent.parent):  # seed<k>, experiment, suite: if empty
                    try:
                        folder.rmdir()
                    except OSError:
                        break


@contextmanager
def _locked(run_dir: Path):
    """An exclusive lock on `run_dir` while the block runs (yields the lock file); a ConfigError naming the holder
    when another process has it.

    The lock is flock(2) on run_dir/.lock: the kernel drops it when its process ends, a SIGKILL included, so a
    requeued job never finds a stale lock. POSIX only: elsewhere the block runs unlocked.
    """
    lock = run_dir / LOCK_FILE
    try:
        import fcntl
    except ImportError:
        yield lock
        return
    with open(lock, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ConfigError(f"{run_dir} is in use by {holder}; wait for it to end or use another out_dir") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield lock
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
