"""mmseg-0.x-equivalent train / test pipelines on numpy samples (mmseg/datasets/pipelines/transforms.py), and the
weak pipelines of U2PL (u2pl/dataset/augmentation.py) and UniMatch (dataset/transform.py) as options of the same
builder.

A sample is a dict: "img" H×W×3 uint8 RGB, "label" H×W uint8 (255 = ignore); every other 2-D numpy array
(e.g. "hard") is a per-pixel mask that follows the geometric steps like the label (nearest, padded with 0), except
a 2-D float array (the stored HL map "hl_map", hlbench/data/hl_maps.py): a continuous map, resized with the image's
interpolation, padded with its own mean (a uniform map stays uniform) and left alone by photometric steps, as the
HL authors' Mask2Former pipeline carried its map as an extra image channel. Other keys pass through. A step is
called as `step(sample, rng)` with a numpy Generator and returns a new dict.

Unlabeled samples (semi-supervised data sets) have no "label" and no "hard"; they carry "pad" instead, an H×W
uint8 mask that every padding step sets to 1 on the pixels it adds, so after crops and flips it still marks the
pixels that are not image (UniMatch's ignore mask, its 254 label). Labeled samples mark padding with their label
fill (255, or U2PL's 0) and carry no "pad".

We keep RGB where mmseg works on BGR. Brightness and contrast treat channels alike and the HSV ops convert with
COLOR_RGB2HSV / COLOR_HSV2RGB, so each output is exactly the channel flip of mmseg's.

Reproducibility: datasets draw one Generator per item with `sample_rng(seed)`, which mixes the run seed with
a draw from torch's RNG. In a DataLoader worker torch seeds that RNG with base_seed + worker_id, where
base_seed comes from the loader's `generator` (fresh each epoch unless persistent_workers); with
num_workers=0 it is the process RNG seeded by torch.manual_seed. Augmentations are therefore reproducible
given (seed, the loader generator's seed, num_workers), and differ between epochs.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

from hlbench.errors import ConfigError
from hlbench.labels import IGNORE_INDEX

PAD_KEY = "pad"


def config_value(cfg, key: str, expected: str, where: str):
    """cfg[key], or a KeyError naming `where.key` and what was expected."""
    if cfg is None or key not in cfg:
        raise ConfigError(f"{where}.{key} is missing: expected {expected}")
    return cfg[key]


def _pair(value, name: str) -> tuple[int, int]:
    if value is None or len(value) != 2:
        raise ConfigError(f"{name} must be a pair of ints, got {value!r}")
    return int(value[0]), int(value[1])


def _ratio_range(value) -> tuple[float, float]:
    if value is None or len(value) != 2 or float(value[0]) > float(value[1]):
        raise ConfigError(f"resize.ratio_range must be [lo, hi] with lo <= hi, got {value!r}")
    return float(value[0]), float(value[1])


def sample_rng(seed: int) -> np.random.Generator:
    """A fresh per-item Generator from (seed, one draw of torch's per-process / per-worker RNG)."""
    return np.random.default_rng([int(seed), int(torch.randint(0, 2**62, ()))])


def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker setup: no OpenCV / torch thread pools per worker (as mmseg's setup_multi_processes)."""
    cv2.setNumThreads(0)
    torch.set_num_threads(1)


def _map_pixels(sample: dict, img_fn, mask_fn) -> dict:
    """Applies img_fn to "img" and to 2-D float maps, mask_fn to the label and every other 2-D mask."""
    out = dict(sample)
    out["img"] = img_fn(sample["img"])
    for key, value in sample.items():
        if key != "img" and isinstance(value, np.ndarray) and value.ndim == 2:
            out[key] = img_fn(value) if value.dtype.kind == "f" else mask_fn(value)
    return out


def rescale_size(w: int, h: int, scale) -> tuple[int, int]:
    """mmcv `imrescale` keep-ratio size law: fit (w, h) so its long/short edges stay within max/min(scale)."""
    factor = min(max(scale) / max(w, h), min(scale) / min(w, h))
    return int(w * factor + 0.5), int(h * factor + 0.5)


class RandomResize:
    """Keep-ratio resize to `scale` [W, H] times r ~ U(ratio_range) (fixed scale when ratio_range is None)."""

    def __init__(self, scale, ratio_range=None):
        self.scale = _pair(scale, "resize.scale [W, H]")
        self.ratio_range = None if ratio_range is None else _ratio_range(ratio_range)

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        scale = self.scale
        if self.ratio_range is not None:
            # mmseg `random_sample_ratio`: the target is floored per side before the keep-ratio fit.
            r = rng.uniform(*self.ratio_range)
            scale = (int(scale[0] * r), int(scale[1] * r))
        h, w = sample["img"].shape[:2]
        size = rescale_size(w, h, scale)
        return _map_pixels(sample, lambda a: cv2.resize(a, size, interpolation=cv2.INTER_LINEAR),
                           lambda m: cv2.resize(m, size, interpolation=cv2.INTER_NEAREST))


class RandomShortestEdge:
    """mmseg 1.x's RandomChoiceResize(scales, resize_type=ResizeShortestEdge, max_size), the Mask2Former recipes'
    train resize: a short side drawn uniformly from `scales`, the long side in proportion, both scaled down together
    if the long side would pass `max_size`, each rounded (detectron2's ResizeShortestEdge law, which mmseg copies);
    then, as mmseg, a keep-ratio Resize to that (W, H), whose own rounding can move a side by one pixel."""

    def __init__(self, scales, max_size):
        if not scales or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in scales):
            raise ConfigError(f"data.train_pipeline.resize.scales must be a non-empty list of positive ints, got "
                              f"{scales!r}")
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < max(scales):
            raise ConfigError(f"data.train_pipeline.resize.max_size must be an int >= the largest scale, got "
                              f"{max_size!r}")
        self.scales, self.max_size = [int(s) for s in scales], int(max_size)

    def target(self, h: int, w: int, short: int) -> tuple[int, int]:
        """(W, H) of ResizeShortestEdge for an h x w image and short side `short`."""
        scale = short / min(h, w)
        new_h, new_w = (short, scale * w) if h < w else (scale * h, short)
        if max(new_h, new_w) > self.max_size:
            shrink = self.max_size / max(new_h, new_w)
            new_h, new_w = new_h * shrink, new_w * shrink
        return int(new_w + 0.5), int(new_h + 0.5)

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        h, w = sample["img"].shape[:2]
        short = self.scales[int(rng.integers(len(self.scales)))]
        size = rescale_size(w, h, self.target(h, w, short))
        return _map_pixels(sample, lambda a: cv2.resize(a, size, interpolation=cv2.INTER_LINEAR),
                           lambda m: cv2.resize(m, size, interpolation=cv2.INTER_NEAREST))


class RandomScaleFactor:
    """U2PL's RandResize: the image's own size times s, with s ~ U(lo, 1) or U(1, hi) with probability 0.5 each.

    Each side is int(side * s), as U2PL does; bilinear (half-pixel centres, like its align_corners=False) for the
    image, nearest for masks.
    """

    def __init__(self, ratio_range):
        self.lo, self.hi = _ratio_range(ratio_range)
        if not self.lo <= 1.0 <= self.hi:
            raise ConfigError(f"resize.ratio_range must contain 1 for mode factor, got {list(ratio_range)}")

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        s = rng.uniform(self.lo, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, self.hi)
        h, w = sample["img"].shape[:2]
        size = (int(w * s), int(h * s))
        return _map_pixels(sample, lambda a: cv2.resize(a, size, interpolation=cv2.INTER_LINEAR),
                           lambda m: cv2.resize(m, size, interpolation=cv2.INTER_NEAREST))


def _pil_resize(a: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    return np.array(Image.fromarray(a).resize(size, resample))


class RandomLongSide:
    """UniMatch's resize: long side ~ randint(int(L * lo), int(L * hi)) (inclusive) of the image's long side L,
    the other side int(side * ratio + 0.5).

    Resampled with PIL (bilinear image, nearest masks) as UniMatch does: PIL's bilinear filter widens when it
    shrinks (antialiasing) where OpenCV's does not, and its nearest samples pixel centres.
    """

    def __init__(self, ratio_range):
        self.lo, self.hi = _ratio_range(ratio_range)

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        h, w = sample["img"].shape[:2]
        long = max(h, w)
        side = int(rng.integers(int(long * self.lo), int(long * self.hi) + 1))
        size = (int(w * side / h + 0.5), side) if h > w else (side, int(h * side / w + 0.5))
        return _map_pixels(sample, lambda a: _pil_resize(a, size, Image.BILINEAR),
                           lambda m: _pil_resize(m, size, Image.NEAREST))


class TestResize:
    """Test-time keep-ratio resize of the image only; label and masks stay at the original size (as mmseg)."""

    def __init__(self, scale):
        self.scale = _pair(scale, "test resize.scale [W, H]")

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        h, w = sample["img"].shape[:2]
        out = dict(sample)
        out["img"] = cv2.resize(sample["img"], rescale_size(w, h, self.scale), interpolation=cv2.INTER_LINEAR)
        return out


class ResizeToMultiple:
    """Test-time image resize so each side is rounded up to a multiple of `divisor` (bilinear); label and masks
    stay at the original size, like TestResize, because the evaluator resizes the logits back to the label.

    mmseg's ResizeToMultiple (mmcv.imresize_to_multiple with scale_factor 1), which the HL authors' SegFormer test
    pipeline runs after the keep-ratio Resize; it resizes (stretches) rather than pads.
    """

    def __init__(self, divisor):
        if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
            raise ConfigError(f"data.test_pipeline.resize_to_multiple must be a positive int, got {divisor!r}")
        self.divisor = divisor

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        h, w = sample["img"].shape[:2]
        size = (-(-w // self.divisor) * self.divisor, -(-h // self.divisor) * self.divisor)
        out = dict(sample)
        out["img"] = cv2.resize(sample["img"], size, interpolation=cv2.INTER_LINEAR)
        return out


class RandomCrop:
    """Uniform crop of `size` [h, w] with mmseg's cat_max_ratio retry rule (10 re-draws, then unchecked)."""

    def __init__(self, size, cat_max_ratio: float = 1.0, ignore_index: int = IGNORE_INDEX):
        self.size = _pair(size, "crop [h, w]")
        self.cat_max_ratio, self.ignore_index = float(cat_max_ratio), int(ignore_index)

    def _box(self, h: int, w: int, rng: np.random.Generator) -> tuple[slice, slice]:
        y = int(rng.integers(0, max(h - self.size[0], 0) + 1))
        x = int(rng.integers(0, max(w - self.size[1], 0) + 1))
        return slice(y, y + self.size[0]), slice(x, x + self.size[1])

    def _balanced(self, label: np.ndarray) -> bool:
        counts = np.bincount(label.ravel(), minlength=self.ignore_index + 1)
        counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        h, w = sample["img"].shape[:2]
        box = self._box(h, w, rng)
        if self.cat_max_ratio < 1.0 and "label" in sample:  # an unlabeled crop has no classes to balance
            for _ in range(10):
                if self._balanced(sample["label"][box]):
                    break
                box = self._box(h, w, rng)
        return _map_pixels(sample, lambda a: a[box], lambda m: m[box])


class RandomFlip:
    """Horizontal flip with probability `prob`."""

    def __init__(self, prob: float = 0.5):
        self.prob = float(prob)

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        if rng.random() >= self.prob:
            return sample
        return _map_pixels(sample, lambda a: a[:, ::-1], lambda m: m[:, ::-1])


def _affine_u8(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg `convert`: float32 x*alpha+beta, clipped to [0, 255], truncated to uint8."""
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


class PhotoMetricDistortion:
    """mmseg 0.x PhotoMetricDistortion: brightness, contrast (before or after), saturation, hue; p=0.5 each."""

    def __init__(self, brightness_delta: int = 32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                 hue_delta: int = 18):
        self.brightness_delta, self.hue_delta = brightness_delta, hue_delta
        self.contrast_range, self.saturation_range = tuple(contrast_range), tuple(saturation_range)

    def _contrast(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _affine_u8(img, alpha=rng.uniform(*self.contrast_range)) if rng.integers(2) else img

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        img = sample["img"]
        if rng.integers(2):
            img = _affine_u8(img, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = rng.integers(2) == 1
        if contrast_first:
            img = self._contrast(img, rng)
        # Saturation and hue each do their own 8-bit HSV round trip, as mmseg 0.x does (it is lossy).
        if rng.integers(2):
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[..., 1] = _affine_u8(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if rng.integers(2):
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            # OpenCV 8-bit hue lives in [0, 180).
            delta = rng.integers(-self.hue_delta, self.hue_delta)
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + delta) % 180
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if not contrast_first:
            img = self._contrast(img, rng)
        out = dict(sample)
        out["img"] = img
        return out


def _pad_sample(sample: dict, top: int, bottom: int, left: int, right: int, image_fill, label_fill: int) -> dict:
    """Adds the margins to every pixel array: image `image_fill`, label `label_fill`, "pad" 1, float maps their mean,
    other masks 0."""
    out = dict(sample)
    for key, value in sample.items():
        if isinstance(value, np.ndarray) and (key == "img" or value.ndim == 2):
            fill = {"img": image_fill, "label": label_fill, PAD_KEY: 1}.get(key, 0)
            if key != "img" and value.dtype.kind == "f":
                fill = float(value.mean())
            h, w = value.shape[:2]
            padded = np.empty((top + h + bottom, left + w + right) + value.shape[2:], value.dtype)
            padded[...] = fill
            padded[top:top + h, left:left + w] = value
            out[key] = padded
    return out


class Pad:
    """Pads bottom/right to `size` [h, w]: image 0, label `label_pad`, masks 0; records img_hw (unpadded)."""

    def __init__(self, size, label_pad: int = IGNORE_INDEX):
        self.size, self.label_pad = _pair(size, "pad size [h, w]"), int(label_pad)

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        h, w = sample["img"].shape[:2]
        ph, pw = self.size
        if h > ph or w > pw:
            raise ConfigError(f"Pad: image {h}x{w} is larger than the pad size {ph}x{pw}")
        out = _pad_sample(sample, 0, ph - h, 0, pw - w, 0, self.label_pad)
        out["img_hw"] = (h, w)
        return out


class PadToCrop:
    """Pads to at least `size` [h, w] before the crop, as U2PL (mode "centre") and UniMatch ("bottom_right") do.

    U2PL pads its normalised image with 0, i.e. the mean colour: pass the mean as `image_fill`, rounded here to
    uint8, which normalises to within 0.01 of 0. UniMatch pads the raw image with black: `image_fill` [0, 0, 0].
    The crop then never needs the final bottom/right pad, so nothing is zeroed on the device (img_hw = the crop).
    """

    MODES = ("centre", "bottom_right")

    def __init__(self, size, mode: str, image_fill, label_fill: int):
        if mode not in self.MODES:
            raise ConfigError(f"pad.mode={mode!r} is not valid; expected one of {', '.join(self.MODES)}")
        fill = np.asarray(image_fill, np.float64)
        if fill.shape != (3,):
            raise ConfigError(f"pad.image_fill must be [R, G, B], got {image_fill!r}")
        self.size, self.mode, self.label_fill = _pair(size, "crop [h, w]"), mode, int(label_fill)
        self.image_fill = np.clip(np.round(fill), 0, 255).astype(np.uint8)

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        h, w = sample["img"].shape[:2]
        ph, pw = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
        if not (ph or pw):
            return sample
        top, left = (ph // 2, pw // 2) if self.mode == "centre" else (0, 0)
        return _pad_sample(sample, top, ph - top, left, pw - left, self.image_fill, self.label_fill)


class ToTensor:
    """numpy sample -> "img" 3×H×W uint8, "label" int64, masks uint8, "img_hw" int64 tensors."""

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        out = dict(sample)
        for key, value in sample.items():
            if key == "img":
                out[key] = torch.from_numpy(np.ascontiguousarray(value.transpose(2, 0, 1)))
            elif key == "label":
                out[key] = torch.from_numpy(value.astype(np.int64))
            elif key == "img_hw":
                out[key] = torch.tensor(value, dtype=torch.int64)
            elif isinstance(value, np.ndarray) and value.ndim == 2:
                out[key] = torch.from_numpy(np.ascontiguousarray(value))
        return out


class Compose:
    """Runs steps in order, passing the same Generator to each."""

    def __init__(self, steps: list):
        self.steps = list(steps)

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        for step in self.steps:
            sample = step(sample, rng)
        return sample


_TRAIN_KEYS = ("resize", "crop", "cat_max_ratio", "flip", "photometric", "pad")
_TEST_KEYS = ("resize", "resize_to_multiple")
# resize.mode -> its keys: mmseg's img_scale x ratio (the default), U2PL's scale factor, UniMatch's long side,
# mmseg 1.x Mask2Former's random shortest edge.
_RESIZE_KEYS = {"ratio": ("mode", "scale", "ratio_range"), "factor": ("mode", "ratio_range"),
                "long_side": ("mode", "ratio_range"), "shortest_edge": ("mode", "scales", "max_size")}
_PAD_KEYS = ("mode", "image_fill", "label_fill")


def _check_keys(cfg, valid: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; valid keys: {list(valid)}")


def _build_resize(resize_cfg):
    where = "data.train_pipeline.resize"
    mode = resize_cfg.get("mode", "ratio")
    if mode not in _RESIZE_KEYS:
        raise ConfigError(f"{where}.mode={mode!r} is not valid; expected one of {', '.join(_RESIZE_KEYS)}")
    _check_keys(resize_cfg, _RESIZE_KEYS[mode], f"{where} (mode {mode})")
    if mode == "ratio":
        return RandomResize(config_value(resize_cfg, "scale", "[W, H]", where), resize_cfg.get("ratio_range"))
    if mode == "shortest_edge":
        return RandomShortestEdge(list(config_value(resize_cfg, "scales", "[short sides]", where)),
                                  config_value(resize_cfg, "max_size", "the long side's limit", where))
    ratio_range = config_value(resize_cfg, "ratio_range", "[lo, hi]", where)
    return RandomScaleFactor(ratio_range) if mode == "factor" else RandomLongSide(ratio_range)


def build_train_pipeline(pipeline_cfg) -> Compose:
    """resize -> [pad to the crop] -> crop -> flip -> photometric -> pad -> tensor, from data.train_pipeline.

    mmseg (RandomCrop, then Pad) crops first and pads the crop bottom/right afterwards. With a `pad` mapping the image
    is padded before the crop instead, as U2PL (centred) and UniMatch (bottom/right) do (augmentation.py, transform.py);
    the final pad is then a no-op that records img_hw. U2PL flips before its crop; with a uniform crop offset
    the order only decides which side of a centred pad gets the odd pixel.
    """
    _check_keys(pipeline_cfg, _TRAIN_KEYS, "data.train_pipeline")
    crop = config_value(pipeline_cfg, "crop", "[h, w]", "data.train_pipeline")
    steps = []
    resize = pipeline_cfg.get("resize")
    if resize is not None:
        steps.append(_build_resize(resize))
    pad = pipeline_cfg.get("pad")
    if pad is not None:
        where = "data.train_pipeline.pad"
        _check_keys(pad, _PAD_KEYS, where)
        steps.append(PadToCrop(crop, config_value(pad, "mode", "centre | bottom_right", where),
                               config_value(pad, "image_fill", "[R, G, B]", where),
                               config_value(pad, "label_fill", "a label id (255 = ignore)", where)))
    steps.append(RandomCrop(crop, pipeline_cfg.get("cat_max_ratio", 1.0)))
    if pipeline_cfg.get("flip", 0.0):
        steps.append(RandomFlip(pipeline_cfg["flip"]))
    if pipeline_cfg.get("photometric", False):
        steps.append(PhotoMetricDistortion())
    steps += [Pad(crop), ToTensor()]
    return Compose(steps)


def build_test_pipeline(pipeline_cfg) -> Compose:
    """Optional keep-ratio image resize -> optional resize to a multiple (labels stay at original size) -> tensor,
    from data.test_pipeline."""
    pipeline_cfg = pipeline_cfg or {}
    _check_keys(pipeline_cfg, _TEST_KEYS, "data.test_pipeline")
    resize = pipeline_cfg.get("resize")
    steps = []
    if resize is not None:
        steps.append(TestResize(config_value(resize, "scale", "[W, H]", "data.test_pipeline.resize")))
    if pipeline_cfg.get("resize_to_multiple") is not None:
        steps.append(ResizeToMultiple(pipeline_cfg["resize_to_multiple"]))
    return Compose(steps + [ToTensor()])


def build_split_pipelines(data_cfg, classes) -> dict:
    """{"train", "val"} pipelines from a data config, after checking data.num_classes against `classes`."""
    num_classes = data_cfg.get("num_classes")
    if num_classes is not None and num_classes != len(classes):
        raise ConfigError(f"data.num_classes={num_classes} but data set {data_cfg.get('name')!r} has "
                          f"{len(classes)} classes")
    return {"train": build_train_pipeline(config_value(data_cfg, "train_pipeline", "a mapping", "data")),
            "val": build_test_pipeline(config_value(data_cfg, "test_pipeline", "a mapping", "data"))}
