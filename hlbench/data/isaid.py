"""iSAID (aerial scenes of DOTA-v1.0 with 15 object classes + background) as mmsegmentation cuts it into patches.

Prepared layout (mmseg `tools/dataset_converters/isaid.py`, `docs/en/user_guides/2_dataset_prepare.md`):
  img_dir/{train,val}/<id>_<y0>_<y1>_<x0>_<x1>.png                      896×896 RGB patches
  ann_dir/{train,val}/<id>_<y0>_<y1>_<x0>_<x1>_instance_color_RGB.png   their class ids 0..15 (255 = padding)
  img_dir/test/<id>.png                                                 the test scenes, uncut (no labels)
`prepare_jobs` makes it from the raw download:
  {train,val,test}/images/*.zip     DOTA-v1.0 scenes, members images/<id>.png
  {train,val}/Semantic_masks/*.zip  iSAID colour masks, members images/<id>_instance_color_RGB.png

The patches are those of mmseg's converter, pixel for pixel: windows of 896 px every 512 px along each side, the
last one shifted back to end at the edge; a side shorter than a patch first padded at the bottom/right (image 0,
label 255); scenes read as RGB (a few are grayscale); mask colours mapped by the iSAID palette, any other colour to
background. Two differences, both in the files only: the labels are 8-bit PNGs of the class ids, where the
converter's `Image.fromarray(..., mode='P')` saves 1-bit PNGs under a current Pillow and so loses every id above 1
(mmsegmentation issues #1504, #1733); and the image patches are PNGs, where it writes BMP bytes under a .png name.
A scene with one side shorter than a patch and the other exactly a patch long is padded here; the converter's
strict comparisons leave it unpadded and cut a short patch at a negative offset from it.
"""
from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image

from hlbench.atomic_files import atomic_write
from hlbench.data.files import folder_pairs, labelled_splits, write_png_atomic
from hlbench.errors import BadFileError, ConfigError, MissingInputError
from hlbench.labels import IGNORE_INDEX

# mmseg iSAIDDataset's names (their capitals included, so per-class log keys match) and the converter's palette.
CLASSES = ("background", "ship", "store_tank", "baseball_diamond", "tennis_court", "basketball_court",
           "Ground_Track_Field", "Bridge", "Large_Vehicle", "Small_Vehicle", "Helicopter", "Swimming_pool",
           "Roundabout", "Soccer_ball_field", "plane", "Harbor")
PALETTE = ((0, 0, 0), (0, 0, 63), (0, 63, 63), (0, 63, 0), (0, 63, 127), (0, 63, 191), (0, 63, 255), (0, 127, 63),
           (0, 127, 127), (0, 0, 127), (0, 0, 191), (0, 0, 255), (0, 191, 127), (0, 127, 191), (0, 127, 255),
           (0, 100, 155))
SPLITS = ("train", "val")
# Patches of the official release (mmseg's dataset_prepare.md).
KNOWN_COUNTS = {"train": 33978, "val": 11644}
PATCH, STRIDE = 896, 512  # the converter's defaults: 896-px patches overlapping by 384 px
IMAGE_SUFFIX, LABEL_SUFFIX = ".png", "_instance_color_RGB.png"
_SCENE_MEMBER = re.compile(r"images/([^/]+)\.png")
_MASK_MEMBER = re.compile(r"images/([^/_]+)[^/]*_instance_color_RGB\.png")


def window_starts(length: int, patch: int = PATCH, stride: int = STRIDE) -> list[int]:
    """The converter's window offsets along a side of `length` >= `patch` px: one every `stride` px from 0, each
    shifted back to end at the edge where it would pass it (shifted windows that coincide give one patch)."""
    return sorted({min(start, length - patch) for start in range(0, length, stride)})


def pad_to_patch(array: np.ndarray, fill: int, patch: int = PATCH) -> np.ndarray:
    """`array` padded at the bottom/right with `fill` so neither side is shorter than `patch`."""
    h, w = array.shape[:2]
    if h >= patch and w >= patch:
        return array
    out = np.full((max(h, patch), max(w, patch)) + array.shape[2:], fill, array.dtype)
    out[:h, :w] = array
    return out


def colours_to_ids(rgb: np.ndarray) -> np.ndarray:
    """Class ids of an RGB iSAID mask: each palette colour its class, any other colour background (0)."""
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    ids = np.zeros(rgb.shape[:2], np.uint8)
    for class_id, (r, g, b) in enumerate(PALETTE):
        ids[code == (r << 16) | (g << 8) | b] = class_id
    return ids


def patch_stem(scene: str, y0: int, x0: int, patch: int = PATCH) -> str:
    return f"{scene}_{y0}_{y0 + patch}_{x0}_{x0 + patch}"


def _read_member(zip_path: Path, member: str) -> bytes:
    with zipfile.ZipFile(zip_path) as archive:
        return archive.read(member)


def _scene_size(zip_path: Path, member: str) -> tuple[int, int]:
    """(H, W) from the scene's PNG header, without decompressing its pixels."""
    try:
        with zipfile.ZipFile(zip_path) as archive, archive.open(member) as f, Image.open(f) as im:
            return im.height, im.width
    except (OSError, SyntaxError, zipfile.BadZipFile) as err:
        raise BadFileError(f"{zip_path}:{member}: not a readable image ({err})") from None


def _decode_scene(zip_path: Path, member: str) -> np.ndarray:
    """H×W×3 RGB, converted as the converter does (PIL `convert('RGB')`: grayscale replicated, alpha dropped)."""
    try:
        with Image.open(io.BytesIO(_read_member(zip_path, member))) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, zipfile.BadZipFile) as err:
        raise BadFileError(f"{zip_path}:{member}: cannot decode the scene ({err})") from None


def _decode_mask(zip_path: Path, member: str) -> np.ndarray:
    """H×W×3 RGB colour mask, decoded as the converter does (OpenCV colour read, then BGR -> RGB)."""
    bgr = cv2.imdecode(np.frombuffer(_read_member(zip_path, member), np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise BadFileError(f"{zip_path}:{member}: cannot decode the mask")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class SceneJob(NamedTuple):
    """Cut one train or val scene and its mask into img_dir/<split>/ and ann_dir/<split>/."""

    scene: str
    image_zip: Path
    image_member: str
    mask_zip: Path
    mask_member: str
    img_dir: Path
    ann_dir: Path

    def run(self) -> tuple[int, int]:
        """(patches written, patches already there); an interrupted scene writes only the patches it lacks."""
        h, w = _scene_size(self.image_zip, self.image_member)
        windows = [(y0, x0, patch_stem(self.scene, y0, x0)) for y0 in window_starts(max(h, PATCH))
                   for x0 in window_starts(max(w, PATCH))]
        todo = [(y0, x0, stem) for y0, x0, stem in windows
                if not ((self.img_dir / f"{stem}{IMAGE_SUFFIX}").is_file()
                        and (self.ann_dir / f"{stem}{LABEL_SUFFIX}").is_file())]
        if not todo:
            return 0, len(windows)
        image, mask = _decode_scene(self.image_zip, self.image_member), _decode_mask(self.mask_zip, self.mask_member)
        if image.shape != mask.shape:
            raise BadFileError(f"{self.image_zip}:{self.image_member} is {h}x{w} but its mask "
                               f"{self.mask_zip}:{self.mask_member} is {mask.shape[0]}x{mask.shape[1]}")
        image, ids = pad_to_patch(image, 0), pad_to_patch(colours_to_ids(mask), IGNORE_INDEX)
        for y0, x0, stem in todo:
            window = (slice(y0, y0 + PATCH), slice(x0, x0 + PATCH))
            image_path, label_path = self.img_dir / f"{stem}{IMAGE_SUFFIX}", self.ann_dir / f"{stem}{LABEL_SUFFIX}"
            if not image_path.is_file():
                write_png_atomic(image_path, cv2.cvtColor(image[window], cv2.COLOR_RGB2BGR))
            if not label_path.is_file():
                write_png_atomic(label_path, ids[window])
        return len(todo), len(windows) - len(todo)


class UncutSceneJob(NamedTuple):
    """Copy one test scene, uncut, to img_dir/test/ (the converter moves the test scenes without cutting them)."""

    image_zip: Path
    image_member: str
    out: Path

    def run(self) -> tuple[int, int]:
        if self.out.is_file():
            return 0, 1
        data = _read_member(self.image_zip, self.image_member)
        atomic_write(self.out, lambda tmp: tmp.write_bytes(data))
        return 1, 0


def _members(zips: list[Path], pattern: re.Pattern) -> dict[str, tuple[Path, str]]:
    """{scene id: (zip, member)} of the members of `zips` that `pattern` matches (its group 1 is the id)."""
    found = {}
    for zip_path in zips:
        try:
            with zipfile.ZipFile(zip_path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            raise BadFileError(f"{zip_path}: not a zip archive (an interrupted download?)") from None
        for name in names:
            if match := pattern.fullmatch(name):
                found[match.group(1)] = (zip_path, name)
    return found


def _zips(folder: Path, what: str) -> list[Path]:
    zips = sorted(folder.glob("*.zip")) if folder.is_dir() else []
    if not zips:
        raise MissingInputError(f"no *.zip in {folder}: expected the {what}, as the download unpacks")
    return zips


def prepare_jobs(root) -> list[SceneJob | UncutSceneJob]:
    """The jobs that write the prepared layout under `root` from the raw zips there (module docstring).

    A train/val scene without its mask, or a mask without its scene, is refused before anything is written; the
    test split is optional (no data set reads it)."""
    root = Path(root)
    jobs: list[SceneJob | UncutSceneJob] = []
    for split in SPLITS:
        scenes = _members(_zips(root / split / "images", "DOTA-v1.0 image zips (members images/<id>.png)"),
                          _SCENE_MEMBER)
        masks = _members(_zips(root / split / "Semantic_masks",
                               "iSAID semantic-mask zips (members images/<id>_instance_color_RGB.png)"), _MASK_MEMBER)
        if unpaired := sorted(set(scenes) ^ set(masks)):
            first = unpaired[0]
            what = f"scene {first} has no mask" if first in scenes else f"mask of {first} has no scene"
            raise MissingInputError(f"{root / split}: {len(unpaired)} scenes and masks are unpaired; the first: {what}")
        jobs += [SceneJob(scene, *scenes[scene], *masks[scene], root / "img_dir" / split, root / "ann_dir" / split)
                 for scene in sorted(scenes)]
    if (root / "test" / "images").is_dir():
        tests = _members(_zips(root / "test" / "images", "DOTA-v1.0 test image zips"), _SCENE_MEMBER)
        jobs += [UncutSceneJob(*tests[scene], root / "img_dir" / "test" / f"{scene}{IMAGE_SUFFIX}")
                 for scene in sorted(tests)]
    return jobs


def isaid_pairs(root, split: str) -> list[tuple[Path, Path, None]]:
    """[(patch, its label, None)] of a prepared split; the labels hold class ids, so no lookup table."""
    if split not in SPLITS:
        raise ConfigError(f"isaid split must be one of {SPLITS}, got {split!r}")
    return folder_pairs(Path(root) / "img_dir" / split, Path(root) / "ann_dir" / split, IMAGE_SUFFIX, LABEL_SUFFIX)


def build_isaid(data_cfg, seed: int) -> dict:
    """{"train", "val"} iSAID patches (16 classes, background included) from data.root and data.{train,val}.split."""
    return labelled_splits(data_cfg, seed, CLASSES, PALETTE, isaid_pairs,
                           "img_dir/ and ann_dir/ of iSAID patches (python -m hlbench.data prepare isaid)")
