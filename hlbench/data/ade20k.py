"""ADE20K SceneParsing (mmseg's ADE20KDataset): ADEChallengeData2016/{images,annotations}/{training,validation}."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hlbench.data.files import IGNORE_INDEX, LabelledFiles, config_split, require_dir
from hlbench.data.transforms import build_split_pipelines, config_value
from hlbench.errors import ConfigError, MissingInputError

# mmseg 0.x ADE20KDataset order; 'bed ' keeps its trailing space so log keys match the authors' log.json.
CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step",
    "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag")
SPLITS = {"train": "training", "val": "validation"}
KNOWN_COUNTS = {"train": 20210, "val": 2000}


def _bit_palette(n: int) -> tuple:
    """Distinct display colours: the bits of the index spread over R, G, B from the high bit down."""
    colours = []
    for i in range(1, n + 1):
        r = g = b = 0
        for shift in range(7, -1, -1):
            r |= (i & 1) << shift
            g |= ((i >> 1) & 1) << shift
            b |= ((i >> 2) & 1) << shift
            i >>= 3
        colours.append((r, g, b))
    return tuple(colours)


PALETTE = _bit_palette(len(CLASSES))


def _reduce_zero_label() -> np.ndarray:
    """mmseg reduce_zero_label as a LUT: 0 -> 255, v -> v - 1, and the resulting 254 -> 255."""
    lut = (np.arange(256) - 1).astype(np.uint8)
    lut[0] = IGNORE_INDEX
    lut[lut == 254] = IGNORE_INDEX
    return lut


REDUCE_ZERO_LABEL = _reduce_zero_label()


def ade20k_pairs(root, split: str) -> list[tuple[Path, Path, np.ndarray]]:
    """[(image, annotation, reduce-zero LUT)]; FileNotFoundError naming a missing folder or label."""
    if split not in SPLITS:
        raise ConfigError(f"ade20k split must be one of {sorted(SPLITS)}, got {split!r}")
    annotations = require_dir(Path(root) / "annotations" / SPLITS[split])
    pairs = []
    for image in sorted(require_dir(Path(root) / "images" / SPLITS[split]).glob("*.jpg")):
        label = annotations / f"{image.stem}.png"
        if not label.is_file():
            raise MissingInputError(f"image {image} has no label: expected {label}")
        pairs.append((image, label, REDUCE_ZERO_LABEL))
    return pairs


class ADE20K(LabelledFiles):
    """ADE20K `split` ("train" | "val") under `root` (= ADEChallengeData2016); 150 classes after reduce-zero."""

    def __init__(self, root, split: str, transform=None, aug_seed: int = 0):
        pairs = ade20k_pairs(root, split)
        if not pairs:
            raise MissingInputError(f"no *.jpg images under {Path(root) / 'images' / SPLITS[split]}")
        # Annotations hold 0 (other) and the 150 class indices.
        super().__init__(pairs, CLASSES, PALETTE, transform, aug_seed, raw_max=len(CLASSES))
        self.root, self.split = Path(root), split


def build_ade20k(data_cfg, seed: int) -> dict:
    """{"train", "val"} ADE20K from data.root and data.{train,val}.split; `seed` drives augmentation."""
    pipelines = build_split_pipelines(data_cfg, CLASSES)
    root = config_value(data_cfg, "root", "the ADEChallengeData2016 folder", "data")
    return {split: ADE20K(root, config_split(data_cfg, split), transform, seed)
            for split, transform in pipelines.items()}
