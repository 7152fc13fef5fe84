"""Synthetic street scenes written in a real data set's on-disk layout, at full resolution.

For trying `prepare`, `check`, `bench` and a whole training run on a machine that has no copy of the data
set yet: the files have real sizes and real PNG content (not noise, which would compress and decode
unlike photographs), and labels in the data set's raw id space, so every real code path runs on them.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from hlbench.data import isaid, synthetic, totaltext
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
# Synthetic class -> iSAID class: vehicles stay vehicles, a few others stand in for aerial classes, the rest
# (ignore included) is background.
_TO_ISAID = {"car": "Small_Vehicle", "truck": "Large_Vehicle", "traffic sign": "ship", "traffic light": "Helicopter",
             "pole": "Bridge", "wire": "Bridge", "vegetation": "Soccer_ball_field", "terrain": "Ground_Track_Field",
             "sky": "Swimming_pool"}
ISAID_LUT = np.zeros(256, np.uint8)
ISAID_LUT[[synthetic.CLASSES.index(c) for c in _TO_ISAID]] = [isaid.CLASSES.index(c) for c in _TO_ISAID.values()]
# Full-size defaults (H, W): Cityscapes 2048x1024, GTA5 1914x1052; a DOTA scene of neither a multiple of the patch
# stride nor below a patch; a Total-Text photo.
DEFAULT_SIZES = {"cityscapes": (1024, 2048), "gta5": (1052, 1914), "isaid": (1100, 1700), "totaltext": (720, 960)}


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


def _append_png(archive_path: Path, member: str, array: np.ndarray) -> None:
    """Add `array` (BGR or gray) as a PNG member of a zip, made on first use; stored, as PNGs gain nothing."""
    archive_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive_path, "a") as archive:
        archive.writestr(member, cv2.imencode(".png", array)[1].tobytes())


_ISAID_SPLITS = ("train", "val", "test")


def _write_isaid(root: Path, split: str, i: int, size) -> Path:
    """Scene i of `split` in the raw download's zips: DOTA images/<id>.png, iSAID colour masks (not for test)."""
    scene = f"P{2000 * _ISAID_SPLITS.index(split) + i:04d}"  # DOTA ids are unique across splits
    img, label, _ = synthetic.generate_scene(size, seed=0, split="train" if split == "train" else "val",
                                             index=i + (1000 if split == "test" else 0))
    # DOTA holds a few grayscale scenes: the first of each split is one.
    pixels = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY if i == 0 else cv2.COLOR_RGB2BGR)
    archive = root / split / "images" / "part1.zip"
    _append_png(archive, f"images/{scene}.png", pixels)
    if split != "test":
        colours = np.asarray(isaid.PALETTE, np.uint8)[ISAID_LUT[label]]
        _append_png(root / split / "Semantic_masks" / "images.zip", f"images/{scene}{isaid.LABEL_SUFFIX}",
                    cv2.cvtColor(colours, cv2.COLOR_RGB2BGR))
    return archive / f"images/{scene}.png"


def _write_totaltext(root: Path, split: str, i: int, size) -> Path:
    """A scene with words painted on it, and their character mask as a JPEG (as the release ships it)."""
    img, _, _ = synthetic.generate_scene(size, seed=0, split="train" if split == "Train" else "val", index=i)
    h, w = img.shape[:2]
    rng = np.random.default_rng([i, int(split == "Train")])
    mask = np.zeros((h, w), np.uint8)
    for word in ("HARD", "PIXELS", "EXIT"):
        origin = (int(rng.integers(0, w * 3 // 4)), int(rng.integers(h // 8, h)))
        cv2.putText(mask, word, origin, cv2.FONT_HERSHEY_SIMPLEX, h / 300, 255, max(1, h // 150))
    img[mask > 0] = rng.integers(0, 256, 3)
    name = f"img{i + 1 + (0 if split == 'Train' else 2000)}"
    for folder in (totaltext.RAW_IMAGES, totaltext.RAW_MASKS):
        (root / folder / split).mkdir(parents=True, exist_ok=True)
    image = root / totaltext.RAW_IMAGES / split / f"{name}.jpg"
    cv2.imwrite(str(image), img[..., ::-1])
    # The release has one mask with an upper-case extension (Train/img61.JPG).
    suffix = ".JPG" if split == "Train" and i == 1 else ".jpg"
    cv2.imwrite(str(root / totaltext.RAW_MASKS / split / f"{name}{suffix}"), mask)
    return image


# Data set -> (splits, writer of one image/label pair).
WRITERS = {"cityscapes": (("train", "val"), _write_cityscapes), "gta5": (("train",), _write_gta5),
           "isaid": (_ISAID_SPLITS, _write_isaid), "totaltext": (("Train", "Test"), _write_totaltext)}


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
