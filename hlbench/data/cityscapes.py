"""Cityscapes fine annotations (cityscapesScripts): leftImg8bit/<split>/<city>/*.png + gtFine trainId labels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CITYSCAPES_LABELS

from hlbench.data.files import IGNORE_INDEX, LabelledFiles, config_split, require_dir
from hlbench.data.semisup import Split, UnlabeledImages, derived_label, resolve_split
from hlbench.data.transforms import build_split_pipelines, config_value
from hlbench.errors import ConfigError, MissingInputError

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
# The largest id a *_labelIds.png holds (33, license plate's -1 is not stored); a larger one is a broken file.
MAX_LABEL_ID = max(label.id for label in _CITYSCAPES_LABELS)


def cityscapes_images(root, split: str) -> list[Path]:
    """Sorted leftImg8bit images of `split`; FileNotFoundError naming a missing folder."""
    if split not in SPLITS:
        raise ConfigError(f"cityscapes split must be one of {SPLITS}, got {split!r}")
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
            raise MissingInputError(f"image {image} has no label: expected {train_ids} or {label_ids}")
    return pairs


class Cityscapes(LabelledFiles):
    """Cityscapes `split` under `root` (19 train-id classes, 255 = ignore)."""

    def __init__(self, root, split: str, transform=None, aug_seed: int = 0):
        pairs = cityscapes_pairs(root, split)
        if not pairs:
            raise MissingInputError(f"no *{IMAGE_SUFFIX} images under {Path(root) / 'leftImg8bit' / split}")
        super().__init__(pairs, CLASSES, PALETTE, transform, aug_seed, raw_max=MAX_LABEL_ID)
        self.root, self.split = Path(root), split


def build_cityscapes(data_cfg, seed: int) -> dict:
    """{"train", "val"} Cityscapes from data.root and data.{train,val}.split; `seed` drives augmentation."""
    pipelines = build_split_pipelines(data_cfg, CLASSES)
    root = config_value(data_cfg, "root", "the Cityscapes folder", "data")
    return {split: Cityscapes(root, config_split(data_cfg, split), transform, seed)
            for split, transform in pipelines.items()}


def cityscapes_split(data_cfg) -> Split:
    """The semi-supervised split of data.split; a seeded one draws from the images of data.train.split."""
    root = Path(config_value(data_cfg, "root", "the Cityscapes folder", "data"))

    def train_list():
        images = (image.relative_to(root).as_posix()
                  for image in cityscapes_images(root, config_split(data_cfg, "train")))
        return [(image, derived_label(image)) for image in images]

    return resolve_split(data_cfg, train_list)


def split_files(root, split: Split, require_all: bool = True) -> tuple[list[tuple[Path, Path, np.ndarray | None]],
                                                                      list[Path]]:
    """([(image, label, lut)] of the labeled list, [unlabeled image]) under `root`, once every listed file exists.

    A listed *_labelTrainIds.png may be replaced by its *_labelIds.png and the id LUT, as for the folder splits.
    require_all=False (data.on_bad_sample=skip) keeps missing files in the lists: reading one skips its sample
    and counts it (bad_samples.py).
    """
    root = Path(root)
    pairs, missing = [], []
    for image, label in split.labeled:
        image, label = root / image, root / label
        if not image.is_file():
            missing.append(image)
        if label.is_file():
            pairs.append((image, label, None))
        elif (label.name.endswith(TRAIN_ID_SUFFIX)
              and (raw := label.with_name(label.name[: -len(TRAIN_ID_SUFFIX)] + LABEL_ID_SUFFIX)).is_file()):
            pairs.append((image, raw, ID_TO_TRAIN_ID))
        else:
            missing.append(label)
            pairs.append((image, label, None))
    unlabeled = [root / image for image in split.unlabeled]
    missing += [image for image in unlabeled if not image.is_file()]
    if missing and require_all:
        total = 2 * len(split.labeled) + len(split.unlabeled)
        raise MissingInputError(f"split {split.source}: {len(missing)} of the {total} listed files are missing "
                                f"under {root}; the first is {missing[0]}")
    return pairs, unlabeled


def build_cityscapes_semisup(data_cfg, seed: int) -> dict:
    """{"train": the labeled list, "unlabeled": the unlabeled images, "val"} of the split data.split selects.

    Labeled and unlabeled crops go through the same train pipeline; `seed` drives augmentation.
    """
    pipelines = build_split_pipelines(data_cfg, CLASSES)
    root = config_value(data_cfg, "root", "the Cityscapes folder", "data")
    require_all = data_cfg.get("on_bad_sample", "error") != "skip"
    pairs, unlabeled = split_files(root, cityscapes_split(data_cfg), require_all)
    return {"train": LabelledFiles(pairs, CLASSES, PALETTE, pipelines["train"], seed, raw_max=MAX_LABEL_ID),
            "unlabeled": UnlabeledImages(unlabeled, pipelines["train"], seed),
            "val": Cityscapes(root, config_split(data_cfg, "val"), pipelines["val"], seed)}
