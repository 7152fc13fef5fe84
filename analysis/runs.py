"""Load run folders (summary.json + config.yaml + metrics.jsonl) into pandas tables."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from hlbench.tracking.run_folder import (CONFIG_FILE, METRICS_FILE, current_metrics, flatten, read_json,
                                         read_jsonl, read_yaml)

SUMMARY_FILE = "summary.json"
# config keys stored as their own columns so tables group by axis instead of parsing run names
CONFIG_AXES = ("experiment", "suite", "seed", "method.name", "model.name", "hl.enabled", "data.name", "data.split")


def find_run_dirs(root) -> list[Path]:
    """Every folder below `root` (any depth, root included) holding both summary.json and config.yaml."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: runs folder not found")
    return sorted(p.parent for p in root.rglob(SUMMARY_FILE) if (p.parent / CONFIG_FILE).is_file())


def load_runs(root) -> pd.DataFrame:
    """One row per run folder: run_dir, the config axes, then summary.json flattened (final.mIoU, best.mIoU...).

    Axis values come from summary.json when it has them, else from config.yaml.
    """
    rows = []
    for run_dir in find_run_dirs(root):
        row = flatten(read_json(run_dir / SUMMARY_FILE))
        config = flatten(read_yaml(run_dir / CONFIG_FILE) or {})
        for axis in CONFIG_AXES:
            if row.get(axis) is None:
                row[axis] = config.get(axis)
        row["run_dir"] = str(run_dir)
        rows.append(row)
    front = ["run_dir", *CONFIG_AXES]
    df = pd.DataFrame(rows, columns=None if rows else front)
    return df[front + [c for c in df.columns if c not in front]]


def read_metrics(run_dir) -> pd.DataFrame:
    """metrics.jsonl as a table sorted by iter: per (mode, iter) the last line, lines superseded by a resume dropped."""
    records = current_metrics(read_jsonl(Path(run_dir) / METRICS_FILE))
    if not records:
        return pd.DataFrame(columns=["mode", "iter"])
    return pd.DataFrame(records).sort_values("iter", kind="stable", ignore_index=True)
