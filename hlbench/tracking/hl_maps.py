"""HL-map panels: image | ground truth | prediction | HL map | CE loss | hardness kinds, one row per image.

The panel is a matplotlib figure (no pyplot, so it renders in any thread and without a display): column titles,
rows of equal tiles, one labelled colour bar under each map column on a scale shared by its rows (so two images'
maps can be compared), a legend of the class colours of the ground truth and prediction shown, and the hardness
kinds of a ground-truth mask drawn apart in one colour each.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from hlbench.atomic_files import atomic_write
from hlbench.labels import IGNORE_INDEX

IGNORE_RGB = (0, 0, 0)
NO_KIND_RGB = (40, 40, 40)
LOSS_PERCENTILE = 99  # the loss colour bar ends here: a few exploding pixels would otherwise blank the rest


def to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _resize(tile: np.ndarray, hw: tuple[int, int], resample) -> np.ndarray:
    if tile.shape[:2] == tuple(hw):
        return tile
    return np.asarray(Image.fromarray(tile).resize((hw[1], hw[0]), resample))


def as_maps(x) -> np.ndarray:
    """N×H×W or N×1×H×W scores (HL maps carry a channel axis) -> N×H×W float32."""
    x = to_numpy(x).astype(np.float32)
    return x[:, 0] if x.ndim == 4 else x


def resize_map(score_map: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """H'×W' float map -> hw, bilinear (HL maps are predicted at input size, labels may be larger)."""
    return _resize(np.asarray(score_map, np.float32), hw, Image.BILINEAR)


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct colours from matplotlib's tab20, for datasets that bring no palette."""
    cmap = matplotlib.colormaps["tab20"]
    return [tuple(int(255 * c) for c in cmap(i % 20)[:3]) for i in range(num_classes)]


def colorize_labels(labels, palette) -> np.ndarray:
    """H×W class ids -> H×W×3 uint8 colours; 255 (ignore) is black."""
    labels = to_numpy(labels).astype(np.int64)
    lut = np.zeros((IGNORE_INDEX + 1, 3), dtype=np.uint8)
    lut[:len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    lut[IGNORE_INDEX] = IGNORE_RGB
    bad = (labels < 0) | ((labels >= len(palette)) & (labels != IGNORE_INDEX))
    if bad.any():
        raise ValueError(f"label value {labels[bad][0]} has no palette colour "
                         f"(palette has {len(palette)} classes, ignore is {IGNORE_INDEX})")
    return lut[labels]


def colorize_hl(hl, cmap: str = "magma") -> np.ndarray:
    """H×W HL scores -> H×W×3 uint8, min-max normalised per image so every map uses the full colour range."""
    hl = to_numpy(hl).astype(np.float64)
    lo, hi = hl.min(), hl.max()
    norm = (hl - lo) / (hi - lo) if hi > lo else np.zeros_like(hl)
    return (matplotlib.colormaps[cmap](norm)[..., :3] * 255).round().astype(np.uint8)


def image_to_hwc(image, hw: tuple[int, int] | None = None) -> np.ndarray:
    """3×H×W uint8 image -> H×W×3 uint8, optionally resized to `hw` (test-time-resized images vs label size)."""
    image = np.ascontiguousarray(to_numpy(image).transpose(1, 2, 0)).astype(np.uint8)
    return image if hw is None else _resize(image, hw, Image.BILINEAR)


def kind_colours(kinds) -> dict[str, tuple[int, int, int]]:
    """One tab10 colour per hardness kind, in the data set's kind order (so a kind keeps its colour everywhere)."""
    cmap = matplotlib.colormaps["tab10"]
    return {k: tuple(int(255 * c) for c in cmap(i % 10)[:3]) for i, k in enumerate(kinds)}


def colorize_kinds(hard: np.ndarray, bits: dict[str, int], order: list[str]) -> np.ndarray:
    """N×H×W hardness bitmasks -> N×H×W×3: each pixel in the colour of its first kind in `order`, else dark grey.

    A pixel can carry several kinds (a pole's edge is thin and boundary); `order` says which one shows.
    """
    colours = kind_colours(bits)
    out = np.empty(hard.shape + (3,), np.uint8)
    out[:] = NO_KIND_RGB
    painted = np.zeros(hard.shape, bool)
    for kind in order:
        has = ((hard & bits[kind]) != 0) & ~painted
        out[has] = colours[kind]
        painted |= has
    return out


def hl_panel_figure(labels, preds=None, palette=None, *, images=None, hl=None, loss=None, hard=None,
                    hard_bits: dict | None = None, max_images: int = 4, title: str | None = None,
                    cmap: str = "magma", class_names=None) -> Figure:
    """Rows of [image, ground truth, prediction, HL map, CE loss, hardness kinds] as a figure with column titles.

    Columns whose input is None (or empty) are left out. Every tile is drawn at the label size; images and maps
    at input size are resized to it. The HL and loss columns each share one colour scale over their rows (with a
    colour bar under it, in a row of its own so every row of tiles lines up), set by the labelled pixels; the loss
    bar ends at their 99th percentile. A legend names the colour of each class the ground truth or prediction
    shows. Hardness kinds are drawn rarest on top, so a kind covering most of the image (synthetic "confusable")
    does not hide the thin and small ones; their legend gives each kind's share of the labelled pixels shown.

    Args:
        labels: int N×H×W class ids, 255 = ignore (black).
        preds: int N×H×W predicted class ids.
        palette: list of (r, g, b) per class; tab20 colours when None.
        images: uint8 N×3×H'×W' un-normalised images.
        hl: float N×H'×W' (or N×1×H'×W') HL scores h.
        loss: float N×H×W per-pixel cross-entropy.
        hard: N×H×W ground-truth hardness bitmask; `hard_bits` ({kind: bit}) names its kinds, without it any
            non-zero pixel is drawn white.
        class_names: one name per palette entry, for the class legend ("class <id>" when None).
    """
    labels = to_numpy(labels)
    n = min(len(labels), max_images)
    if n == 0:
        raise ValueError("hl_panel_figure: got no images (labels has length 0 or max_images < 1)")
    labels = labels[:n]
    hw = labels.shape[1:]
    if palette is None:
        palette = default_palette(int(labels[labels != IGNORE_INDEX].max(initial=0)) + 1)
    valid = labels != IGNORE_INDEX
    columns = []  # (title, tiles N×H×W×3 or N×H×W floats, imshow kwargs)
    if images is not None:
        columns.append(("image", [image_to_hwc(to_numpy(images)[i], hw) for i in range(n)], {}))
    columns.append(("ground truth", [colorize_labels(labels[i], palette) for i in range(n)], {}))
    if preds is not None:
        columns.append(("prediction", [colorize_labels(to_numpy(preds)[i], palette) for i in range(n)], {}))
    if hl is not None:
        hl = np.stack([resize_map(m, hw) for m in as_maps(hl)[:n]])
        scored = hl[valid] if valid.any() else hl  # the scale of the pixels the loss weights, not of ignored ones
        columns.append(("HL map h", list(hl), {"cmap": cmap, "vmin": float(scored.min()), "vmax": float(scored.max())}))
    if loss is not None:
        loss = as_maps(loss)[:n]
        top = float(np.percentile(loss[valid], LOSS_PERCENTILE)) if valid.any() else 1.0
        columns.append(("CE loss", list(loss), {"cmap": cmap, "vmin": 0.0, "vmax": max(top, 1e-6)}))
    bar_labels = {"HL map h": "h (learned hardness)", "CE loss": f"CE (nats), capped at p{LOSS_PERCENTILE}"}
    shown = np.unique(np.concatenate([labels.ravel()] + ([to_numpy(preds)[:n].ravel()] if preds is not None else [])))
    names = list(class_names) if class_names is not None else [f"class {i}" for i in range(len(palette))]
    class_legend = [Patch(color=np.array(palette[c]) / 255, label=names[c] if c < len(names) else f"class {c}")
                    for c in shown if c != IGNORE_INDEX]
    if (shown == IGNORE_INDEX).any():
        class_legend.append(Patch(color=np.array(IGNORE_RGB) / 255, label="ignore"))
    legend = []
    if hard is not None and len(hard):
        hard = to_numpy(hard)[:n].astype(np.int64)
        if hard_bits:
            share = {k: float(((hard & b) != 0)[valid].mean()) if valid.any() else 0.0 for k, b in hard_bits.items()}
            order = sorted(hard_bits, key=lambda k: share[k])
            columns.append(("hardness kinds, rarest on top", list(colorize_kinds(hard, hard_bits, order)), {}))
            colours = kind_colours(hard_bits)
            legend = [Patch(color=np.array(colours[k]) / 255, label=f"{k} {100 * share[k]:.2g}%") for k in hard_bits]
            legend.append(Patch(color=np.array(NO_KIND_RGB) / 255, label="none"))
        else:
            mask = np.repeat(((hard != 0).astype(np.uint8) * 255)[..., None], 3, axis=-1)
            columns.append(("hardness mask", list(mask), {}))

    tile_w = 2.0
    tile_h = tile_w * hw[0] / hw[1]
    bar_h = 0.12  # the colour bars' row, in tile heights
    fig = Figure(figsize=(tile_w * len(columns), tile_h * (n + bar_h) + 1.6 + (0.3 if title else 0)),
                 layout="constrained")
    axes = np.asarray(fig.subplots(n + 1, len(columns), squeeze=False, height_ratios=[1] * n + [bar_h]))
    for c, (name, tiles, kwargs) in enumerate(columns):
        for r in range(n):
            ax = axes[r, c]
            im = ax.imshow(tiles[r], interpolation="nearest", **kwargs)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
        if "cmap" in kwargs:
            bar = fig.colorbar(im, cax=axes[n, c], orientation="horizontal",
                               extend="max" if name == "CE loss" else "neither")
            bar.ax.tick_params(labelsize=7)
            bar.set_label(bar_labels[name], fontsize=7)
        else:
            axes[n, c].axis("off")
    for handles, heading, where in ((class_legend, "classes (ground truth, prediction)", "outside lower left"),
                                    (legend, "hardness kinds, % of labelled pixels", "outside lower right")):
        if handles:
            fig.legend(handles=handles, loc=where, ncol=min(len(handles), len(columns)), fontsize=7, frameon=False,
                       handlelength=1, title=heading, title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write the figure atomically (format from the suffix), so a killed job never leaves half a PNG."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi))
