"""On-disk (image, label) pair data sets: decoding, label lookup tables and atomic PNG writes."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from hlbench.data.transforms import Compose, ToTensor, config_value, sample_rng
from hlbench.atomic_files import atomic_write
from hlbench.labels import IGNORE_INDEX


def require_dir(path: Path) -> Path:
    """`path`, or a FileNotFoundError naming the missing folder."""
    if not path.is_dir():
        raise FileNotFoundError(f"missing folder {path}")
    return path


def read_image(path) -> np.ndarray:
    """RGB uint8 H×W×3 (cv2 decodes BGR; the pipelines work on RGB, see transforms.py)."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_label(path) -> np.ndarray:
    """Single-channel uint8 label map as stored (no colour conversion)."""
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise FileNotFoundError(f"cannot read label {path}")
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"label {path} must be a single-channel 8-bit PNG, got shape {label.shape} {label.dtype}")
    return label


def read_palette_indices(path) -> np.ndarray:
    """Raw palette indices of a "P" PNG; OpenCV always expands palettes to colour, so Pillow reads these."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"label {path} must be a palette (P) or 8-bit (L) PNG, got mode {im.mode}")
        return np.asarray(im, dtype=np.uint8)


def image_size(path) -> tuple[int, int]:
    """(H, W) from the file header, without decoding the pixels."""
    with Image.open(path) as im:
        return im.height, im.width


def write_png_atomic(path: Path, array: np.ndarray) -> None:
    """Writes a PNG atomically, so an interrupted run never leaves a partial output."""
    def write(tmp):
        if not cv2.imwrite(str(tmp), array):
            raise OSError(f"cannot write {path}")
    atomic_write(path, write)


class LabelledFiles(Dataset):
    """(image, label) file pairs; items are the contract's dicts produced by `transform(sample, rng)`.

    Args:
        pairs: [(image path, label path, lut)]; lut is a 256-entry uint8 table applied to the raw label, or None.
        read_raw: reads a label that needs its lut (default read_label).
        aug_seed: mixed into each item's augmentation Generator (see transforms.sample_rng).
    """

    def __init__(self, pairs: list, classes, palette, transform=None, aug_seed: int = 0, read_raw=read_label):
        if not pairs:
            raise ValueError("no (image, label) pairs found")
        self.pairs, self.read_raw, self.aug_seed = list(pairs), read_raw, int(aug_seed)
        self.classes, self.palette = list(classes), [tuple(c) for c in palette]
        self.transform = transform if transform is not None else Compose([ToTensor()])

    def __len__(self) -> int:
        return len(self.pairs)

    def load_label(self, index: int) -> np.ndarray:
        """The label in train ids (0..C-1, 255 = ignore), at the stored size."""
        _, label_path, lut = self.pairs[index]
        return read_label(label_path) if lut is None else lut[self.read_raw(label_path)]

    def __getitem__(self, index: int) -> dict:
        img, label = read_image(self.pairs[index][0]), self.load_label(index)
        if img.shape[:2] != label.shape:
            raise ValueError(f"image {self.pairs[index][0]} is {img.shape[:2]} but its label is {label.shape}")
        # Real data sets carry no hardness annotation: an all-zero mask means "unknown" (contract).
        sample = {"img": img, "label": label, "hard": np.zeros_like(label), "index": int(index)}
        return self.transform(sample, sample_rng(self.aug_seed))


def check_mapped_labels(dataset, num_files: int = 3, ignore_index: int = IGNORE_INDEX) -> None:
    """Refuse to evaluate on unmapped labels: the first files must hold only train ids (0..C-1) or ignore.

    A raw Cityscapes labelIds file silently scores garbage otherwise; checking a few files costs milliseconds.
    """
    load = getattr(dataset, "load_label", None)
    if load is None:  # generated data sets have no files to get wrong
        return
    for index in range(min(num_files, len(dataset))):
        values = np.unique(load(index))
        bad = values[(values >= len(dataset.classes)) & (values != ignore_index)]
        if bad.size:
            raise ValueError(f"label {dataset.pairs[index][1]} holds values {bad.tolist()[:5]} outside "
                             f"0..{len(dataset.classes) - 1} and {ignore_index}: map it to train ids first "
                             "(python -m hlbench.data prepare ...)")


def config_split(data_cfg, split: str) -> str:
    """data.<split>.split: the on-disk split name a pipeline split ("train" / "val") reads."""
    return config_value(config_value(data_cfg, split, "{split: <name>}", "data"), "split", "a split name",
                        f"data.{split}")
