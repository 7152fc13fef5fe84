"""Synthetic street scenes written in a real data set's on-disk layout, at full resolution.

For trying `prepare`, `check`, `bench` and a whole training run on a machine that has no copy of the data
set yet: the files have real sizes and real PNG content (not noise, which would compress and decode
unlike photographs), and labels in the data set's raw id space, so every real code path runs on them.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from hlbench.data import synthetic
from hlbench.data.cityscapes import IMAGE_SUFFIX, LABEL_ID_SUFFIX
from hlbench.data.files import IGNORE_INDEX
from hlbench.errors import ConfigError

# Synthetic class -> Cityscapes labelId (cityscapesScripts' table); wires have no Cityscapes class and
# become 0 ("unlabeled"), which the id -> trainId table sends to the ignore index, as a real label would.
_TO_LABEL_ID = {"road": 7, "sidewalk": 8, "building": 11, "wire": 0, "pole": 17, "traffic light": 19,
                "traffic sign": 20, "vegetation": 21, "terrain": 22, "sky": 23, "car": 26, "truck": 27}
LABEL_ID_LUT = np.zeros(256, np.uint8)
LABEL_ID_LUT[[synthetic.CLASSES.index(c) for c in _TO_LABEL_ID]] = list(_TO_LABEL_ID.values())
LABEL_ID_LUT[IGNORE_INDEX] = 0
# Full-size defaults (H, W): Cityscapes 2048x1024, GTA5 1914x1052.
DEFAULT_SIZES = {"cityscapes": (1024, 2048), "gta5": (1052, 1914)}


def _scene(size, split: str, index: int, domain: str) -> tuple[np.ndarray, np.ndarray]:
    img, label, _ = synthetic.generate_scene(size, seed=0, split=split, index=index, domain=domain)
    return img, LABEL_ID_LUT[label]


def _write_cityscapes(root: Path, split: str, i: int, size) -> Path:
    city = "mockcity" if split == "train" else "mockval"
    stem = f"{city}_{i:06d}_000019"
    for folder in ("leftImg8bit", "gtFine"):
        (root / folder / split / city).mkdir(parents=True, exist_ok=True)
    img, ids = _scene(size, split, i, "target")
    image = root / "leftImg8bit" / split / city / f"{stem}{IMAGE_SUFFIX}"
    cv2.imwrite(str(image), img[..., ::-1])
    cv2.imwrite(str(root / "gtFine" / split / city / f"{stem}{LABEL_ID_SUFFIX}"), ids)
    return image


def _write_gta5(root: Path, split: str, i: int, size) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    img, ids = _scene(size, split, i, "source")
    image = root / "images" / f"{i + 1:05d}.png"
    cv2.imwrite(str(image), img[..., ::-1])
    # GTA5 labels are palette PNGs whose indices are Cityscapes ids.
    label = Image.fromarray(ids, "P")
    label.putpalette([v for k in range(256) for v in (k, k, k)])
    label.save(root / "labels" / image.name)
    return image


# Data set -> (splits, writer of one image/label pair).
WRITERS = {"cityscapes": (("train", "val"), _write_cityscapes), "gta5": (("train",), _write_gta5)}


def write_mock(name: str, root, n: int, size=None) -> list[Path]:
    """Write `n` scenes per split of data set `name` under `root` (new or empty); returns the image paths.

    Args:
        size: (H, W); default the data set's native resolution.
    """
    if name not in WRITERS:
        raise ConfigError(f"mock supports {sorted(WRITERS)}, got {name!r}")
    root = Path(root)
    # Never mix mock files into (or overwrite) a real copy of a data set.
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root} is not empty: mock data is only written into a new or empty folder")
    size = tuple(size) if size is not None else DEFAULT_SIZES[name]
    splits, writer = WRITERS[name]
    jobs = [(split, i) for split in splits for i in range(int(n))]
    return [writer(root, split, i, size) for split, i in tqdm(jobs, desc=f"mock {name}", unit="img")]
