"""HL-map panels: image | ground truth | prediction | HL map | hardness mask, one row per image."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

from hlbench.labels import IGNORE_INDEX

GAP = 2  # white pixels between tiles, so black (ignore) regions of neighbouring tiles stay apart


def to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _resize(tile: np.ndarray, hw: tuple[int, int], resample) -> np.ndarray:
    if tile.shape[:2] == tuple(hw):
        return tile
    return np.asarray(Image.fromarray(tile).resize((hw[1], hw[0]), resample))


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct colours from matplotlib's tab20, for datasets that bring no palette."""
    cmap = matplotlib.colormaps["tab20"]
    return [tuple(int(255 * c) for c in cmap(i % 20)[:3]) for i in range(num_classes)]


def colorize_labels(labels, palette) -> np.ndarray:
    """H×W class ids -> H×W×3 uint8 colours; 255 (ignore) is black."""
    labels = to_numpy(labels).astype(np.int64)
    lut = np.zeros((IGNORE_INDEX + 1, 3), dtype=np.uint8)
    lut[:len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
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


def render_hl_panel(images, hl, labels, preds, palette, hard=None, max_images: int = 4,
                    cmap: str = "magma") -> np.ndarray:
    """Rows of [image, ground truth, prediction, HL map(, hardness mask)] as one uint8 RGB array.

    Every tile is drawn at the label size; images and HL maps (input size) are resized to it.

    Args:
        images: uint8 N×3×H'×W' un-normalised images.
        hl: float N×H'×W' (or N×1×H'×W') HL scores; None (model without HL branch) drops the column.
        labels, preds: int N×H×W class ids, 255 = ignore (black).
        palette: list of (r, g, b) per class.
        hard: optional N×H×W hardness bitmask, non-zero pixels drawn white; None or empty drops the column.
    """
    hl = None if hl is None else to_numpy(hl)
    if hl is not None and hl.ndim == 4:
        hl = hl[:, 0]
    hard = None if hard is None or len(hard) == 0 else hard
    labels, preds = to_numpy(labels), to_numpy(preds)
    n = min(len(labels), max_images)
    if n == 0:
        raise ValueError("render_hl_panel: got no images (labels has length 0 or max_images < 1)")
    rows = []
    for i in range(n):
        hw = labels[i].shape
        tiles = [image_to_hwc(images[i], hw), colorize_labels(labels[i], palette), colorize_labels(preds[i], palette)]
        if hl is not None:
            tiles.append(_resize(colorize_hl(hl[i], cmap), hw, Image.BILINEAR))
        if hard is not None:
            mask = (to_numpy(hard[i]) != 0).astype(np.uint8) * 255
            tiles.append(np.repeat(mask[..., None], 3, axis=2))
        gap = np.full((hw[0], GAP, 3), 255, dtype=np.uint8)
        rows.append(np.concatenate([part for t in tiles for part in (t, gap)][:-1], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, GAP), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)[:-GAP]


def save_png(array: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path
