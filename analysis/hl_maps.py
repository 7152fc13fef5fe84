"""HL-map pictures and hardness tables from a run's snapshots (hl_maps/maps_<iter>.npz, the fixed val images).

A snapshot holds the HL map, the per-pixel CE loss, the label, the ground-truth hardness bitmask and (runs since
the panel redraw) the image, the prediction, the class names, the palette and the hardness kinds' bits, so every
picture here is drawn from the file alone. Older snapshots lack the latter: their panels leave out the image and
prediction columns, and classes are named by id.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.runs import SUMMARY_FILE
from hlbench.errors import MissingInputError
from hlbench.labels import IGNORE_INDEX
from hlbench.tracking.hl_maps import colorize_labels, default_palette, hl_panel_figure, image_to_hwc
from hlbench.tracking.run_folder import read_json
from hlbench.tracking.snapshots import load_snapshot, snapshot_paths

def snapshot_at(run_dir, it: int | None = None) -> tuple[int, dict]:
    """(iteration, snapshot) of a run: the one at `it`, or the last one."""
    paths = dict(snapshot_paths(run_dir))
    if not paths:
        raise MissingInputError(f"{Path(run_dir) / 'hl_maps'}: no maps_*.npz snapshot (a baseline run, or "
                                "train.hl_map_interval never reached)")
    if it is None:
        it = max(paths)
    if it not in paths:
        raise KeyError(f"{run_dir}: no snapshot at iteration {it}; snapshots: {sorted(paths)}")
    return it, load_snapshot(paths[it])


def class_names(snap: dict, run_dir=None) -> list[str]:
    """The snapshot's class names; for older snapshots the run's summary.json classes, else "class <id>"."""
    if "classes" in snap:
        return [str(c) for c in snap["classes"]]
    summary = Path(run_dir) / SUMMARY_FILE if run_dir is not None else None
    if summary is not None and summary.is_file():
        iou = (read_json(summary).get("final") or {}).get("IoU")
        if iou:
            return list(iou)
    present = snap["label"][snap["label"] != IGNORE_INDEX]
    return [f"class {i}" for i in range(int(present.max(initial=0)) + 1)]


def hard_bits(snap: dict) -> dict[str, int]:
    """{kind: bit} of the snapshot's hardness mask; {} for snapshots that do not name their kinds."""
    return {str(k): int(b) for k, b in zip(snap.get("kinds", ()), snap.get("bits", ()))}


def palette(snap: dict) -> list[tuple[int, int, int]]:
    if "palette" in snap:
        return [tuple(int(v) for v in c) for c in snap["palette"]]
    return default_palette(len(class_names(snap)))


def snapshot_figure(run_dir, it: int | None = None, max_images: int = 4, title: str | None = None) -> Figure:
    """The panel (image | ground truth | prediction | HL map | CE loss | hardness kinds) of one snapshot, titled
    "<title, else the run folder>, iteration <it>"."""
    it, snap = snapshot_at(run_dir, it)
    run = title or f"{Path(run_dir).parent.name}/{Path(run_dir).name}"
    return hl_panel_figure(snap["label"], snap.get("pred"), palette(snap), images=snap.get("image"), hl=snap["hl"],
                           loss=snap["loss"], hard=snap["hard"], hard_bits=hard_bits(snap), max_images=max_images,
                           title=f"{run}, iteration {it}", class_names=class_names(snap, run_dir))


def _means(groups: dict[str, np.ndarray], snap: dict) -> pd.DataFrame:
    rows = [{"pixels": int(m.sum()), "mean HL": float(snap["hl"][m].mean()) if m.any() else np.nan,
             "mean CE loss": float(snap["loss"][m].mean()) if m.any() else np.nan} for m in groups.values()]
    return pd.DataFrame(rows, index=list(groups))


def class_hardness(run_dir, it: int | None = None) -> pd.DataFrame:
    """Per class over the snapshot's labelled pixels: pixels, mean HL, mean CE loss; hardest (by HL) first.

    The HL map is normalised per image by the method, so means compare classes within a run, not across runs.
    """
    _, snap = snapshot_at(run_dir, it)
    groups = {name: snap["label"] == i for i, name in enumerate(class_names(snap, run_dir))}
    out = _means(groups, snap).rename_axis("class").reset_index()
    return out[out["pixels"] > 0].sort_values("mean HL", ascending=False, ignore_index=True)


def kind_hardness(run_dir, it: int | None = None) -> pd.DataFrame:
    """Per hardness kind (and "none": labelled pixels of no kind): pixels, share, mean HL, mean CE loss.

    Kinds overlap (a pole's edge is thin and boundary), so shares need not add up to 1.
    """
    _, snap = snapshot_at(run_dir, it)
    valid = snap["label"] != IGNORE_INDEX
    bits = hard_bits(snap)
    if not bits:
        return pd.DataFrame(columns=["kind", "pixels", "share", "mean HL", "mean CE loss"])
    hard = snap["hard"].astype(np.int64)
    groups = {k: valid & ((hard & b) != 0) for k, b in bits.items()} | {"none": valid & (hard == 0)}
    out = _means(groups, snap).rename_axis("kind").reset_index()
    out.insert(2, "share", out["pixels"] / max(int(valid.sum()), 1))
    return out


def _spread(items: list, k: int) -> list:
    """At most k items evenly spread over the list, first and last always included."""
    if len(items) <= k:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, k).round().astype(int)]


def snapshot_grid(run_dir, image: int = 0, max_snapshots: int = 6, cmap: str = "magma") -> Figure:
    """One val image through training: columns = snapshots (evenly spread), rows = HL map and CE loss.

    Each row shares one colour scale over its snapshots (labelled pixels; colour bar beside it): a stable HL map
    keeps its picture while the loss map fades as the network fits the pixels. The first column shows the image
    (or labels) for reference.
    """
    paths = _spread(snapshot_paths(run_dir), max_snapshots)
    if not paths:
        raise MissingInputError(f"{Path(run_dir) / 'hl_maps'}: no maps_*.npz snapshot")
    snaps = [(it, load_snapshot(p)) for it, p in paths]
    first = snaps[-1][1]
    if not 0 <= image < len(first["label"]):
        raise IndexError(f"snapshot_grid: image {image} out of range (the snapshots hold {len(first['label'])})")
    label = first["label"][image]
    reference = (image_to_hwc(first["image"][image], label.shape) if "image" in first
                 else colorize_labels(label, palette(first)))
    fig = Figure(figsize=(1.8 * (len(snaps) + 1), 4.4), layout="constrained")
    axes = np.asarray(fig.subplots(2, len(snaps) + 1, squeeze=False))
    for r, (key, name, unit) in enumerate((("hl", "HL map h", "h (learned hardness)"),
                                           ("loss", "CE loss", "CE (nats), capped at p99"))):
        maps = np.stack([s[key][image] for _, s in snaps])
        valid = label != IGNORE_INDEX
        scored = maps[:, valid] if valid.any() else maps  # as the panel: the scale of the labelled pixels
        vmax = float(np.percentile(scored, 99)) if key == "loss" else float(scored.max())
        vmin = 0.0 if key == "loss" else float(scored.min())
        axes[r, 0].imshow(reference if r == 0 else colorize_labels(label, palette(first)), interpolation="nearest")
        axes[r, 0].set_title("image" if r == 0 and "image" in first else "ground truth", fontsize=9)
        for c, (it, _) in enumerate(snaps, start=1):
            im = axes[r, c].imshow(maps[c - 1], cmap=cmap, vmin=vmin, vmax=max(vmax, vmin + 1e-6),
                                   interpolation="nearest")
            axes[r, c].set_title(f"{name}, iter {it}", fontsize=8)
        fig.colorbar(im, ax=axes[r, 1:], orientation="vertical", shrink=0.9, aspect=12).set_label(unit, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{Path(run_dir).parent.name}/{Path(run_dir).name}: val image {image} through training", fontsize=10)
    return fig
