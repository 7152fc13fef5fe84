"""Total-Text scene text as a two-class (background, character) segmentation data set, in the layout the HL
authors' TotalTextDataset reads (data root `totaltext_char`, images `.jpg`, labels `.png`):
  images/{Train,Test}/<name>.jpg
  annotations/{Train,Test}/<name>.png     0 background, 1 character
1,255 train and 300 test images (cs-chan/Total-Text-Dataset, Dataset/README.md); the test split is the val set.

`prepare_jobs` makes it from the downloads unpacked under one folder:
  Images/{Train,Test}/*.jpg                the images (totaltext.zip)
  groundtruth_pixel/{Train,Test}/<name>.*  the "Character Level Mask" pixel ground truth
                                           (Total-Text-Dataset, Groundtruth/Pixel/Character Level Mask)
A mask is found by its image's name whatever its extension's case (one ships as img61.JPG).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from hlbench.atomic_files import atomic_write
from hlbench.data.bad_samples import BadSampleError
from hlbench.data.files import folder_pairs, labelled_splits, read_image, require_dir, write_png_atomic
from hlbench.errors import BadFileError, ConfigError, MissingInputError

# The authors' class names, 'Backgroud' misspelt as in their logs, so per-class log keys match (IoU.Character).
CLASSES = ("Backgroud", "Character")
PALETTE = ((0, 0, 0), (255, 255, 255))
SPLITS = {"train": "Train", "val": "Test"}
KNOWN_COUNTS = {"train": 1255, "val": 300}
IMAGE_SUFFIX, LABEL_SUFFIX = ".jpg", ".png"
RAW_IMAGES, RAW_MASKS = "Images", "groundtruth_pixel"
# A mask pixel is a character where its brightest channel reaches mid-grey.
THRESHOLD = 128


def binarise(mask: Image.Image) -> np.ndarray:
    """{0, 1} uint8 character mask of a decoded ground-truth mask of any mode.

    1 where the brightest channel is at least mid-grey (128): JPEG ringing round the 0/255 strokes falls back on
    the side it came from, and strokes drawn in a colour rather than white still count. A mask already stored as
    {0, 1} is taken as it is. The EXIF orientation is applied, as OpenCV applies it to the image.
    """
    brightest = np.asarray(ImageOps.exif_transpose(mask).convert("RGB")).max(axis=2)
    return brightest if brightest.max() <= 1 else (brightest >= THRESHOLD).astype(np.uint8)


def _image_shape(path: Path) -> tuple[int, int]:
    """(H, W) of an image as the data set decodes it."""
    try:
        return read_image(path).shape[:2]
    except BadSampleError as err:  # two-argument errors do not survive the trip back from a worker process
        raise BadFileError(str(err)) from None


def _link_or_copy(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src` (no second copy on disk), or a copy across file systems."""
    def write(tmp: Path) -> None:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    atomic_write(dst, write)


class LabelJob(NamedTuple):
    """Write one image's {0, 1} label to annotations/ and the image, under its prepared name, to images/."""

    image: Path
    mask: Path
    image_out: Path
    label_out: Path

    def run(self) -> tuple[int, int]:
        """(1, 0) when it wrote anything, (0, 1) when both files were there."""
        if self.image_out.is_file() and self.label_out.is_file():
            return 0, 1
        if not self.label_out.is_file():
            try:
                with Image.open(self.mask) as im:
                    label = binarise(im)
            except (OSError, SyntaxError, ValueError) as err:
                raise BadFileError(f"{self.mask}: cannot decode the mask ({err})") from None
            if label.shape != (shape := _image_shape(self.image)):
                raise BadFileError(f"{self.image} is {shape[0]}x{shape[1]} but its mask {self.mask} is "
                                   f"{label.shape[0]}x{label.shape[1]}")
            write_png_atomic(self.label_out, label)
        if not self.image_out.is_file():
            _link_or_copy(self.image, self.image_out)
        return 1, 0


def prepare_jobs(root) -> list[LabelJob]:
    """The jobs that write images/ and annotations/ under `root` from the raw folders there (module docstring);
    an image without its mask is refused before anything is written."""
    root = Path(root)
    jobs = []
    for split in SPLITS.values():
        masks = {p.stem: p for p in require_dir(root / RAW_MASKS / split).iterdir() if p.is_file()}
        images = sorted(p for p in require_dir(root / RAW_IMAGES / split).iterdir()
                        if p.suffix.lower() == IMAGE_SUFFIX)
        if not images:
            raise MissingInputError(f"no *{IMAGE_SUFFIX} images in {root / RAW_IMAGES / split}")
        if missing := [image for image in images if image.stem not in masks]:
            raise MissingInputError(f"{len(missing)} images in {root / RAW_IMAGES / split} have no mask in "
                                    f"{root / RAW_MASKS / split}; the first: {missing[0].name}")
        jobs += [LabelJob(image, masks[image.stem], root / "images" / split / f"{image.stem}{IMAGE_SUFFIX}",
                          root / "annotations" / split / f"{image.stem}{LABEL_SUFFIX}") for image in images]
    return jobs


def totaltext_pairs(root, split: str) -> list[tuple[Path, Path, None]]:
    """[(image, label, None)] of a prepared split ("train" = Train, "val" = Test)."""
    if split not in SPLITS:
        raise ConfigError(f"totaltext split must be one of {sorted(SPLITS)}, got {split!r}")
    return folder_pairs(Path(root) / "images" / SPLITS[split], Path(root) / "annotations" / SPLITS[split],
                        IMAGE_SUFFIX, LABEL_SUFFIX)


def build_totaltext(data_cfg, seed: int) -> dict:
    """{"train", "val"} Total-Text (background, character) from data.root and data.{train,val}.split."""
    return labelled_splits(data_cfg, seed, CLASSES, PALETTE, totaltext_pairs, "images/{Train,Test}/ and "
                           "annotations/{Train,Test}/ of Total-Text (python -m hlbench.data prepare totaltext)")
