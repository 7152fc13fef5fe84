"""Cityscapes fine annotations (datasets.md §1-§2): leftImg8bit/<split>/<city>/*.png + gtFine trainId labels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CITYSCAPES_LABELS

from hlbench.data.files import IGNORE_INDEX, LabelledFiles, config_split, require_dir
from hlbench.data.transforms import build_split_pipelines, config_value

CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
           "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
           (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
           (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))
SPLITS = ("train", "val", "test")
KNOWN_COUNTS = {"train": 2975, "val": 500}
IMAGE_SUFFIX = "_leftImg8bit.png"
TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"
LABEL_ID_SUFFIX = "_gtFine_labelIds.png"


def _id_to_train_id() -> np.ndarray:
    """256-entry LUT from the official cityscapesScripts table; ids without a train id (and -1) map to 255."""
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for label in _CITYSCAPES_LABELS:
        if 0 <= label.id < 256 and 0 <= label.trainId < len(CLASSES):
            lut[label.id] = label.trainId
    return lut


ID_TO_TRAIN_ID = _id_to_train_id()


def cityscapes_images(root, split: str) -> list[Path]:
    """Sorted leftImg8bit images of `split`; FileNotFoundError naming a missing folder."""
    if split not in SPLITS:
        raise ValueError(f"cityscapes split must be one of {SPLITS}, got {split!r}")
    return sorted(require_dir(Path(root) / "leftImg8bit" / split).glob(f"*/*{IMAGE_SUFFIX}"))


def label_candidates(root, image: Path) -> tuple[Path, Path]:
    """(labelTrainIds path, labelIds path) of an image: same city folder under gtFine/ (mmseg convention)."""
    stem = image.name[: -len(IMAGE_SUFFIX)]
    folder = Path(root) / "gtFine" / image.parent.parent.name / image.parent.name
    return folder / f"{stem}{TRAIN_ID_SUFFIX}", folder / f"{stem}{LABEL_ID_SUFFIX}"


def cityscapes_pairs(root, split: str) -> list[tuple[Path, Path, np.ndarray | None]]:
    """[(image, label, lut)]: the labelTrainIds file when present, else the labelIds file and the id LUT."""
    require_dir(Path(root) / "gtFine" / split)
    pairs = []
    for image in cityscapes_images(root, split):
        train_ids, label_ids = label_candidates(root, image)
        if train_ids.is_file():
            pairs.append((image, train_ids, None))
        elif label_ids.is_file():
            pairs.append((image, label_ids, ID_TO_TRAIN_ID))
        else:
            raise FileNotFoundError(f"image {image} has no label: expected {train_ids} or {label_ids}")
    return pairs


class Cityscapes(LabelledFiles):
    """Cityscapes `split` under `root` (19 train-id classes, 255 = ignore)."""

    def __init__(self, root, split: str, transform=None, aug_seed: int = 0):
        pairs = cityscapes_pairs(root, split)
        if not pairs:
            raise FileNotFoundError(f"no *{IMAGE_SUFFIX} images under {Path(root) / 'leftImg8bit' / split}")
        super().__init__(pairs, CLASSES, PALETTE, transform, aug_seed)
        self.root, self.split = Path(root), split


def build_cityscapes(data_cfg, seed: int) -> dict:
    """{"train", "val"} Cityscapes from data.root and data.{train,val}.split; `seed` drives augmentation."""
    pipelines = build_split_pipelines(data_cfg, CLASSES)
    root = config_value(data_cfg, "root", "the Cityscapes folder", "data")
    return {split: Cityscapes(root, config_split(data_cfg, split), transform, seed)
            for split, transform in pipelines.items()}
