"""Load run folders (summary.json + config.yaml + metrics.jsonl) into pandas tables.

One seed is one sample: where an (experiment, seed) ran more than once (`seed0`, `seed0-2`, ... after a run was
repeated with resume=false), only its newest complete run is loaded, and the table says which it took. Runs on
different semi-supervised splits are different samples.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pandas as pd

from hlbench.errors import MissingInputError
from hlbench.tracking.run_folder import (CONFIG_FILE, METRICS_FILE, current_metrics, flatten, read_json,
                                         read_jsonl, read_yaml)

SUMMARY_FILE = "summary.json"
# config keys stored as their own columns so tables group by axis instead of parsing run names
CONFIG_AXES = ("experiment", "suite", "seed", "method.name", "model.name", "hl.enabled", "data.name", "data.split")
# Only from summary.json: the config's `suite` is the command line's default (smoke), not the suite of a lone
# experiment= run.
SUMMARY_ONLY = ("suite",)
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = "outputs"  # hlbench.run's out_dir, relative to where `make run` runs it: the project root


def runs_folder(value: str | None = None) -> Path:
    """The absolute runs folder a notebook or tool reads: `value` (e.g. $HLBENCH_RUNS), else <project>/outputs.

    A relative `value` is looked up from the working folder, then from $PWD (the folder `jupyter lab` was started
    from: a kernel runs in the notebook's folder), then from the project root; the first that exists wins, the
    project root's when none does.
    """
    if not value:
        return PROJECT_ROOT / DEFAULT_RUNS
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    bases = [Path.cwd(), *([Path(os.environ["PWD"])] if os.environ.get("PWD") else []), PROJECT_ROOT]
    return next(((base / path).resolve() for base in bases if (base / path).is_dir()), (PROJECT_ROOT / path).resolve())


def find_run_dirs(root) -> list[Path]:
    """Every folder below `root` (any depth, root included) holding both summary.json and config.yaml."""
    root = Path(root)
    if not root.is_dir():
        raise MissingInputError(f"{root}: runs folder not found")
    return sorted(p.parent for p in root.rglob(SUMMARY_FILE) if (p.parent / CONFIG_FILE).is_file())


def _sample_key(run_dir: Path, summary: dict) -> tuple:
    """What makes runs repeats of one sample: experiment, semi-supervised split and seed, in one folder
    <experiment>[-<profile>]/ (so a profile's dry runs stay apart; a lone experiment= run and a suite's run of it
    do not)."""
    if summary.get("experiment") is None or summary.get("seed") is None:
        return (str(run_dir),)  # not an hlbench run folder: never merged
    return summary["experiment"], (summary.get("split") or {}).get("source"), run_dir.parent.name, summary["seed"]


def newest_per_seed(run_dirs: list[Path]) -> tuple[list[tuple[Path, dict]], list[dict]]:
    """([(run_dir, summary)] with one run per (experiment, seed): the newest complete one, i.e. whose summary.json
    was written last; [{"kept", "left_out": [...]}] for every sample that had repeats), in run_dirs' order."""
    groups: dict[tuple, list[tuple[Path, dict]]] = {}
    for run_dir in run_dirs:
        summary = read_json(run_dir / SUMMARY_FILE)
        groups.setdefault(_sample_key(run_dir, summary), []).append((run_dir, summary))
    kept, repeats = {}, []
    for runs in groups.values():
        newest = max(runs, key=lambda r: (r[0] / SUMMARY_FILE).stat().st_mtime_ns)
        kept[newest[0]] = newest[1]
        if len(runs) > 1:
            repeats.append({"kept": str(newest[0]), "left_out": [str(d) for d, _ in runs if d != newest[0]]})
    return [(d, kept[d]) for d in run_dirs if d in kept], repeats


def repeats_note(runs: pd.DataFrame) -> str:
    """One line per (experiment, seed) run more than once: which run load_runs counted, which it left out."""
    return "\n".join(f"counted {r['kept']} (newest of {1 + len(r['left_out'])} runs of one experiment and seed), "
                     f"left out {', '.join(r['left_out'])}" for r in runs.attrs.get("repeats", []))


def load_runs(root, missing_ok: bool = False) -> pd.DataFrame:
    """One row per run folder: run_dir, the config axes, then summary.json flattened (final.mIoU, best.mIoU...).

    Axis values come from summary.json when it has them, else from config.yaml (never `suite`).
    An (experiment, seed) run more than once counts once, its newest complete run (newest_per_seed);
    `.attrs["repeats"]` lists what was left out (repeats_note). missing_ok: a missing `root` gives no rows.
    """
    found = [] if missing_ok and not Path(root).is_dir() else find_run_dirs(root)
    runs, repeats = newest_per_seed(found)
    rows = []
    for run_dir, summary in runs:
        row = flatten(summary)
        config = flatten(read_yaml(run_dir / CONFIG_FILE) or {})
        for axis in CONFIG_AXES:
            if row.get(axis) is None and axis not in SUMMARY_ONLY:
                row[axis] = config.get(axis)
        row["run_dir"] = str(run_dir)
        rows.append(row)
    front = ["run_dir", *CONFIG_AXES]
    df = pd.DataFrame(rows, columns=None if rows else front)
    df = df[front + [c for c in df.columns if c not in front]]
    df.attrs["repeats"] = repeats
    return df


def notebook_runs(value: str | None = None) -> tuple[Path, pd.DataFrame]:
    """(runs_folder(value), its load_runs table) for a notebook: prints the folder and any repeats left out, and
    warns when the folder holds no run."""
    folder = runs_folder(value)
    runs = load_runs(folder, missing_ok=True)
    print(f"runs folder: {folder}")
    if note := repeats_note(runs):
        print(note)
    if runs.empty:
        why = "does not exist" if not folder.is_dir() else "holds no run folder (summary.json + config.yaml)"
        warnings.warn(f"{folder} {why}: run `make run`, or set HLBENCH_RUNS to a runs folder", stacklevel=2)
    return folder, runs


def read_metrics(run_dir) -> pd.DataFrame:
    """metrics.jsonl as a table sorted by iter: per (mode, iter) the last line, lines superseded by a resume dropped."""
    records = current_metrics(read_jsonl(Path(run_dir) / METRICS_FILE))
    if not records:
        return pd.DataFrame(columns=["mode", "iter"])
    return pd.DataFrame(records).sort_values("iter", kind="stable", ignore_index=True)
