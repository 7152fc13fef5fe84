"""mmseg-0.x-equivalent train / test pipelines on numpy samples (datasets.md §5-§6).

A sample is a dict: "img" H×W×3 uint8 RGB, "label" H×W uint8 (255 = ignore); every other 2-D numpy array
(e.g. "hard") is a per-pixel mask that follows the geometric steps like the label (nearest, padded with 0).
Other keys pass through. A step is called as `step(sample, rng)` with a numpy Generator and returns a new dict.

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

from hlbench.labels import IGNORE_INDEX


def config_value(cfg, key: str, expected: str, where: str):
    """cfg[key], or a KeyError naming `where.key` and what was expected."""
    if cfg is None or key not in cfg:
        raise KeyError(f"{where}.{key} is missing: expected {expected}")
    return cfg[key]


def _pair(value, name: str) -> tuple[int, int]:
    if value is None or len(value) != 2:
        raise ValueError(f"{name} must be a pair of ints, got {value!r}")
    return int(value[0]), int(value[1])


def _ratio_range(value) -> tuple[float, float]:
    if value is None or len(value) != 2 or float(value[0]) > float(value[1]):
        raise ValueError(f"resize.ratio_range must be [lo, hi] with lo <= hi, got {value!r}")
    return float(value[0]), float(value[1])


def sample_rng(seed: int) -> np.random.Generator:
    """A fresh per-item Generator from (seed, one draw of torch's per-process / per-worker RNG)."""
    return np.random.default_rng([int(seed), int(torch.randint(0, 2**62, ()))])


def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker setup: no OpenCV / torch thread pools per worker (performance.md §5.2)."""
    cv2.setNumThreads(0)
    torch.set_num_threads(1)


def _map_pixels(sample: dict, img_fn, mask_fn) -> dict:
    """Applies img_fn to "img" and mask_fn to the label and every other 2-D mask."""
    out = dict(sample)
    out["img"] = img_fn(sample["img"])
    for key, value in sample.items():
        if key != "img" and isinstance(value, np.ndarray) and value.ndim == 2:
            out[key] = mask_fn(value)
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


class TestResize:
    """Test-time keep-ratio resize of the image only; label and masks stay at the original size (§6)."""

    def __init__(self, scale):
        self.scale = _pair(scale, "test resize.scale [W, H]")

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        h, w = sample["img"].shape[:2]
        out = dict(sample)
        out["img"] = cv2.resize(sample["img"], rescale_size(w, h, self.scale), interpolation=cv2.INTER_LINEAR)
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
        if self.cat_max_ratio < 1.0:
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


class Pad:
    """Pads bottom/right to `size` [h, w]: image 0, label `label_pad`, masks 0; records img_hw (unpadded)."""

    def __init__(self, size, label_pad: int = IGNORE_INDEX):
        self.size, self.label_pad = _pair(size, "pad size [h, w]"), int(label_pad)

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        h, w = sample["img"].shape[:2]
        ph, pw = self.size
        if h > ph or w > pw:
            raise ValueError(f"Pad: image {h}x{w} is larger than the pad size {ph}x{pw}")

        def pad(a: np.ndarray, value: int) -> np.ndarray:
            out = np.full((ph, pw) + a.shape[2:], value, a.dtype)
            out[:h, :w] = a
            return out

        out = {k: pad(v, self.label_pad if k == "label" else 0)
               if isinstance(v, np.ndarray) and (k == "img" or v.ndim == 2) else v for k, v in sample.items()}
        out["img_hw"] = (h, w)
        return out


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


_TRAIN_KEYS = ("resize", "crop", "cat_max_ratio", "flip", "photometric")
_TEST_KEYS = ("resize",)


def _check_keys(cfg, valid: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise KeyError(f"{where}: unknown keys {unknown}; valid keys: {list(valid)}")


def build_train_pipeline(pipeline_cfg) -> Compose:
    """resize -> crop -> flip -> photometric -> pad -> tensor, from data.train_pipeline (datasets.md §5)."""
    _check_keys(pipeline_cfg, _TRAIN_KEYS, "data.train_pipeline")
    crop = config_value(pipeline_cfg, "crop", "[h, w]", "data.train_pipeline")
    steps = []
    resize = pipeline_cfg.get("resize")
    if resize is not None:
        steps.append(RandomResize(config_value(resize, "scale", "[W, H]", "data.train_pipeline.resize"),
                                  resize.get("ratio_range")))
    steps.append(RandomCrop(crop, pipeline_cfg.get("cat_max_ratio", 1.0)))
    if pipeline_cfg.get("flip", 0.0):
        steps.append(RandomFlip(pipeline_cfg["flip"]))
    if pipeline_cfg.get("photometric", False):
        steps.append(PhotoMetricDistortion())
    steps += [Pad(crop), ToTensor()]
    return Compose(steps)


def build_test_pipeline(pipeline_cfg) -> Compose:
    """Optional keep-ratio image resize (labels stay at original size) -> tensor, from data.test_pipeline."""
    pipeline_cfg = pipeline_cfg or {}
    _check_keys(pipeline_cfg, _TEST_KEYS, "data.test_pipeline")
    resize = pipeline_cfg.get("resize")
    steps = []
    if resize is not None:
        steps.append(TestResize(config_value(resize, "scale", "[W, H]", "data.test_pipeline.resize")))
    return Compose(steps + [ToTensor()])


def build_split_pipelines(data_cfg, classes) -> dict:
    """{"train", "val"} pipelines from a data config, after checking data.num_classes against `classes`."""
    num_classes = data_cfg.get("num_classes")
    if num_classes is not None and num_classes != len(classes):
        raise ValueError(f"data.num_classes={num_classes} but data set {data_cfg.get('name')!r} has "
                         f"{len(classes)} classes")
    return {"train": build_train_pipeline(config_value(data_cfg, "train_pipeline", "a mapping", "data")),
            "val": build_test_pipeline(config_value(data_cfg, "test_pipeline", "a mapping", "data"))}
