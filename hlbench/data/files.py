"""On-disk (image, label) pair data sets: decoding, label lookup tables and atomic PNG writes."""
from __future__ import annotations

import io
import logging
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from hlbench.data.transforms import Compose, ToTensor, build_split_pipelines, config_value, sample_rng
from hlbench.atomic_files import atomic_write
from hlbench.data.bad_samples import BadSampleError, BadSampleLog
from hlbench.data.decoded_cache import read_through
from hlbench.errors import ConfigError, MissingInputError
from hlbench.labels import IGNORE_INDEX

log = logging.getLogger("hlbench")


def require_dir(path: Path) -> Path:
    """`path`, or a FileNotFoundError naming the missing folder."""
    if not path.is_dir():
        raise MissingInputError(f"missing folder {path}")
    return path


_PNG_SIGNATURE, _PNG_END = b"\x89PNG\r\n\x1a\n", b"\x00\x00\x00\x00IEND\xaeB`\x82"  # IEND: the last chunk
_JPEG_SIGNATURE, _JPEG_END = b"\xff\xd8", b"\xff\xd9"                                     # SOI ... EOI
_TAIL = 1024  # bytes searched for the end marker: a few writers append a trailer after it
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_warned: set[tuple[str, str]] = set()


def folder_pairs(images: Path, labels: Path, image_suffix: str, label_suffix: str) -> list[tuple[Path, Path, None]]:
    """[(image, label, None)] of the images in `images` named *<image_suffix> (in any case: a disk that ignores case
    may hold IMG.JPG for img.jpg), each with its label <stem><label_suffix> in `labels`, which holds train ids.

    MissingInputError names a missing folder, or the first image without its label."""
    require_dir(labels)
    pairs = []
    for image in sorted(p for p in require_dir(images).iterdir() if p.name.lower().endswith(image_suffix)):
        label = labels / f"{image.name[: -len(image_suffix)]}{label_suffix}"
        if not label.is_file():
            raise MissingInputError(f"image {image} has no label: expected {label}")
        pairs.append((image, label, None))
    return pairs


def _read_bytes(path) -> bytes:
    """The file's bytes, refusing a missing file and a PNG or JPEG cut short (a copy that stopped mid-file).

    OpenCV 4 decodes a truncated JPEG into a partly grey image with only a warning, so the end marker is checked.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadSampleError(path, "file not found") from None
    except OSError as err:
        raise BadSampleError(path, f"cannot read ({err.strerror})") from None
    for signature, end in ((_PNG_SIGNATURE, _PNG_END), (_JPEG_SIGNATURE, _JPEG_END)):
        if data.startswith(signature) and end not in data[-_TAIL:]:
            raise BadSampleError(path, "truncated: the file ends before its end marker (an interrupted copy?)")
    return data


def _warn_once(path, what: str) -> None:
    if (str(path), what) not in _warned:
        _warned.add((str(path), what))
        log.warning("%s: %s", path, what)


def _image_mode(path, data: bytes) -> str:
    """Pillow's mode of the file from its header, refusing what is no image and 16-bit images."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            mode = im.mode
    except (OSError, SyntaxError, ValueError):  # Pillow's errors for unidentifiable or broken headers
        raise BadSampleError(path, "not a readable image (corrupt file or unknown format)") from None
    # Pillow reads 48/64-bit PNGs as RGB(A): the IHDR bit depth (byte 24) tells.
    if mode in _SIXTEEN_BIT_MODES or (data.startswith(_PNG_SIGNATURE) and data[24] == 16):
        raise BadSampleError(path, f"16-bit image (mode {mode}); the pipelines expect 8-bit images: convert it")
    return mode


def read_image(path) -> np.ndarray:
    """RGB uint8 H×W×3 (cv2 decodes BGR; the pipelines work on RGB, see transforms.py).

    Decoded as mmseg's loader does (OpenCV, colour flag: EXIF orientation applied, every 8-bit mode converted to
    3 channels). Grayscale images are replicated to R=G=B and an alpha channel is dropped, each with a warning;
    16-bit, truncated and undecodable files raise BadSampleError.
    """
    data = _read_bytes(path)
    mode = _image_mode(path, data)
    if mode in ("1", "L", "LA"):
        _warn_once(path, "grayscale image, read as R=G=B")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        _warn_once(path, "image has an alpha channel, which is dropped")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise BadSampleError(path, "cannot decode the image (corrupt file)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_label(path) -> np.ndarray:
    """Single-channel uint8 label map as stored (no colour conversion)."""
    data = _read_bytes(path)
    label = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise BadSampleError(path, "cannot decode the label (corrupt file)")
    if data.startswith(_PNG_SIGNATURE) and data[24] < 8:  # IHDR bit depth
        raise BadSampleError(path, f"a {data[24]}-bit PNG holds too few values for class ids (mmseg's iSAID "
                                   "converter writes 1-bit labels under a current Pillow, mmsegmentation #1504): "
                                   "write 8-bit labels, e.g. with python -m hlbench.data prepare")
    if label.ndim != 2 or label.dtype != np.uint8:
        raise BadSampleError(path, f"a label must be a single-channel 8-bit PNG, got shape {label.shape} "
                                   f"{label.dtype}")
    return label


def read_palette_indices(path) -> np.ndarray:
    """Raw palette indices of a "P" PNG; OpenCV always expands palettes to colour, so Pillow reads these."""
    data = _read_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("P", "L"):
                raise BadSampleError(path, f"a label must be a palette (P) or 8-bit (L) PNG, got mode {im.mode}")
            return np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError) as err:
        raise BadSampleError(path, f"cannot decode the label ({err})") from None


def outside_values(values: np.ndarray, max_value: int, ignore_index: int = IGNORE_INDEX) -> list[int]:
    """The distinct values of `values` outside 0..max_value that are not the ignore index ([] when none).

    One comparison pass (~1 ms for a 2048×1024 label); the distinct values are sorted out only when there are some.
    """
    outside = (values > max_value) & (values != ignore_index)
    return np.unique(values[outside]).tolist() if outside.any() else []


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
    """(image, label) file pairs; items are the contract's dicts (data.protocol) produced by
    `transform(sample, rng)`. Files carry no ground-truth hardness (hard_bits {}).

    Every item's label is checked: a trainIds label (lut None) may hold only 0..C-1 and 255, a raw label only
    0..raw_max and 255 before its lut; a bad file raises BadSampleError (see bad_samples.py for what happens then).

    Args:
        pairs: [(image path, label path, lut)]; lut is a 256-entry uint8 table applied to the raw label, or None.
        read_raw: reads a label that needs its lut (default read_label).
        raw_max: the largest raw value the lut maps (the data set's label table), None where any value is valid.
        aug_seed: mixed into each item's augmentation Generator (see transforms.sample_rng).
        bad_samples: the log of this data set's bad files (default: a new one in error mode).
    """

    def __init__(self, pairs: list, classes, palette, transform=None, aug_seed: int = 0, read_raw=read_label,
                 raw_max: int | None = None, bad_samples: BadSampleLog | None = None):
        if not pairs:
            raise ConfigError("no (image, label) pairs found")
        self.pairs, self.read_raw, self.aug_seed, self.raw_max = list(pairs), read_raw, int(aug_seed), raw_max
        self.classes, self.palette = list(classes), [tuple(c) for c in palette]
        self.hard_bits: dict[str, int] = {}
        self.transform = transform if transform is not None else Compose([ToTensor()])
        self.bad_samples = bad_samples if bad_samples is not None else BadSampleLog()
        self.bad_samples.size = len(self.pairs)
        self.decoded = None  # a DecodedCache (data.decoded_cache), or decode every time

    def __len__(self) -> int:
        return len(self.pairs)

    def load_label(self, index: int) -> np.ndarray:
        """The label in train ids (0..C-1, 255 = ignore), at the stored size; BadSampleError for bad values."""
        _, label_path, lut = self.pairs[index]
        if lut is None:
            label = read_through(self.decoded, read_label, label_path)
            if bad := outside_values(label, len(self.classes) - 1):
                raise BadSampleError(label_path, f"values {bad[:5]} are outside the train ids "
                                                 f"0..{len(self.classes) - 1} and {IGNORE_INDEX}: map the labels "
                                                 "to train ids first (python -m hlbench.data prepare ...)")
            return label
        raw = read_through(self.decoded, self.read_raw, label_path)
        if self.raw_max is not None and (bad := outside_values(raw, self.raw_max)):
            raise BadSampleError(label_path, f"raw values {bad[:5]} are outside the label table "
                                             f"0..{self.raw_max} and {IGNORE_INDEX}")
        return lut[raw]

    def __getitem__(self, index: int) -> dict:
        image_path, label_path, _ = self.pairs[index]
        img, label = read_through(self.decoded, read_image, image_path), self.load_label(index)
        if img.shape[:2] != label.shape:
            raise BadSampleError(image_path, f"image is {img.shape[0]}x{img.shape[1]} but its label {label_path} "
                                             f"is {label.shape[0]}x{label.shape[1]}")
        # Real data sets carry no hardness annotation: an all-zero mask means "unknown" (contract).
        sample = {"img": img, "label": label, "hard": np.zeros_like(label), "index": int(index)}
        return self.transform(sample, sample_rng(self.aug_seed))


def check_mapped_labels(dataset, num_files: int = 3) -> None:
    """Refuse to evaluate on unmapped labels: the first files must hold only train ids (0..C-1) or ignore.

    A raw Cityscapes labelIds file silently scores garbage otherwise; checking a few files costs milliseconds.
    With data.on_bad_sample=skip a bad file among them is recorded and left out; all of them bad is an error.
    """
    load = getattr(dataset, "load_label", None)
    if load is None:  # generated data sets have no files to get wrong
        return
    checked = range(min(num_files, len(dataset)))
    errors = []
    for index in checked:
        try:
            load(index)
        except BadSampleError as err:
            dataset.bad_samples.reject(err.path, err.reason)
            errors.append(err)
    if checked and len(errors) == len(checked):
        raise errors[0]


def labelled_splits(data_cfg, seed: int, classes, palette, pairs_of, layout: str) -> dict:
    """{"train", "val"} LabelledFiles of the splits data.{train,val}.split under data.root, listed by
    `pairs_of(root, split)`; `seed` drives augmentation, `layout` says what data.root holds (for the errors)."""
    pipelines = build_split_pipelines(data_cfg, classes)
    root = config_value(data_cfg, "root", layout, "data")
    out = {}
    for split, transform in pipelines.items():
        if not (pairs := pairs_of(root, config_split(data_cfg, split))):
            raise MissingInputError(f"data.root={root} holds no {config_split(data_cfg, split)} images; expected "
                                    f"{layout}")
        out[split] = LabelledFiles(pairs, classes, palette, transform, seed)
    return out


def config_split(data_cfg, split: str) -> str:
    """data.<split>.split: the on-disk split name a pipeline split ("train" / "val") reads."""
    return config_value(config_value(data_cfg, split, "{split: <name>}", "data"), "split", "a split name",
                        f"data.{split}")
