"""GTA5 "Playing for Data" (DAFormer's GTADataset): images/*.png, labels/*.png palette PNGs of Cityscapes ids."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from hlbench.data.cityscapes import CLASSES, ID_TO_TRAIN_ID, PALETTE, Cityscapes
from hlbench.data.files import LabelledFiles, config_split, read_palette_indices, require_dir
from hlbench.data.transforms import build_split_pipelines, config_value
from hlbench.errors import MissingInputError

KNOWN_COUNT = 24966
TRAIN_ID_SUFFIX = "_labelTrainIds.png"
# DAFormer converts only names ending in "<digit>.png", so its own outputs are never taken for raw labels.
RAW_LABEL = re.compile(r".*\d\.png$")


def gta5_images(root) -> list[Path]:
    """Sorted images/*.png; FileNotFoundError naming a missing folder."""
    require_dir(Path(root) / "labels")
    return sorted(require_dir(Path(root) / "images").glob("*.png"))


def gta5_pairs(root) -> tuple[list[tuple[Path, Path, np.ndarray | None]], list[Path]]:
    """([(image, label, lut)], images without any label); labels/<stem>_labelTrainIds.png is preferred."""
    labels = Path(root) / "labels"
    pairs, unlabelled = [], []
    for image in gta5_images(root):
        train_ids, raw = labels / f"{image.stem}{TRAIN_ID_SUFFIX}", labels / image.name
        if train_ids.is_file():
            pairs.append((image, train_ids, None))
        elif raw.is_file():
            pairs.append((image, raw, ID_TO_TRAIN_ID))
        else:
            unlabelled.append(image)
    return pairs, unlabelled


class GTA5(LabelledFiles):
    """All labelled GTA5 images under `root` (Cityscapes train ids); images without a label are skipped.

    Some redistributed copies miss labels; `python -m hlbench.data check gta5` lists them.
    """

    def __init__(self, root, transform=None, aug_seed: int = 0):
        pairs, self.unlabelled = gta5_pairs(root)
        if not pairs:
            raise MissingInputError(f"no labelled images under {Path(root) / 'images'}")
        super().__init__(pairs, CLASSES, PALETTE, transform, aug_seed, read_raw=read_palette_indices)
        self.root = Path(root)


def build_gta5_to_cityscapes(data_cfg, seed: int) -> dict:
    """Domain generalisation: train on GTA5 (data.root), validate on Cityscapes val (data.cityscapes_root)."""
    pipelines = build_split_pipelines(data_cfg, CLASSES)
    return {"train": GTA5(config_value(data_cfg, "root", "the GTA5 folder", "data"), pipelines["train"], seed),
            "val": Cityscapes(config_value(data_cfg, "cityscapes_root", "the Cityscapes folder", "data"),
                              config_split(data_cfg, "val"), pipelines["val"], seed)}
