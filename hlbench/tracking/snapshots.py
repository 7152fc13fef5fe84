"""HL-map snapshots: a run's raw HL and CE-loss maps of the fixed val images, hl_maps/maps_<iter>.npz.

The trainer writes one at every evaluation and every train.hl_map_interval iterations; the analysis (stability, HL
maps, the HL study) and the notebooks read them back. This module is the file format, both ways.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import BadFileError

SNAPSHOT_RE = re.compile(r"maps_(\d+)\.npz$")
REQUIRED = ("hl", "loss", "label", "hard")
# Written since the panels are redrawn from the file: image, prediction, class names, palette, hardness kinds.
EXTRAS = ("image", "pred", "classes", "palette", "kinds", "bits")


def snapshot_path(run_dir, it: int) -> Path:
    return Path(run_dir) / "hl_maps" / f"maps_{it:06d}.npz"


def save_snapshot(run_dir, it: int, *, hl, loss, label, hard, image, pred, classes: list[str], palette,
                  kinds: dict[str, int]) -> Path:
    """Write iteration `it`'s maps of K images (arrays K×H×W; image K×3×H×W uint8); returns the file."""
    path = snapshot_path(run_dir, it)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, hl=np.asarray(hl).astype(np.float16), loss=np.asarray(loss).astype(np.float16),
                        label=np.asarray(label).astype(np.uint8), hard=np.asarray(hard),
                        image=np.asarray(image).astype(np.uint8), pred=np.asarray(pred).astype(np.uint8),
                        classes=np.array(classes, dtype=str), palette=np.array(palette, np.uint8).reshape(-1, 3),
                        kinds=np.array(list(kinds), dtype=str), bits=np.array(list(kinds.values()), np.int64))
    return path


def snapshot_paths(run_dir) -> list[tuple[int, Path]]:
    """(iter, path) of every snapshot of a run, by iteration."""
    found = [(int(m.group(1)), p) for p in (Path(run_dir) / "hl_maps").glob("maps_*.npz")
             if (m := SNAPSHOT_RE.search(p.name))]
    return sorted(found)


def load_snapshot(path) -> dict[str, np.ndarray]:
    """One snapshot: float32 hl / loss and the label / hard arrays, all K×H×W, plus whichever of EXTRAS the file
    holds (files written before them have none); a BadFileError naming the file for a missing required array."""
    with np.load(path) as npz:
        if missing := [k for k in REQUIRED if k not in npz.files]:
            raise BadFileError(f"{path}: missing arrays {missing} (expected {', '.join(REQUIRED)})")
        label = npz["label"]
        # hl can carry a singleton channel axis (K×1×H×W); the pixel grid is the label's.
        snap = {"hl": npz["hl"].astype(np.float32).reshape(label.shape),
                "loss": npz["loss"].astype(np.float32).reshape(label.shape), "label": label,
                "hard": npz["hard"].reshape(label.shape)}
        snap.update({k: npz[k] for k in EXTRAS if k in npz.files})
    return snap


def kind_bits(snapshot: dict) -> dict[str, int]:
    """{hardness kind: bit} of a loaded snapshot ({} for files written before the kinds were stored)."""
    if "kinds" not in snapshot:
        return {}
    return {str(k): int(b) for k, b in zip(snapshot["kinds"], snapshot["bits"])}
