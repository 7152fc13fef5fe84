"""Stored HL maps (data.hl_map_dir): one trained HL model's logits per training image, attached to each sample.

A map folder, written by `python -m hlbench.hlmap export`, holds manifest.json and, per training image, <key>.npy:
the raw HL logits D of that image at the HL head's output size (1/8 of the test-resized image for an output-stride-8
model), float16. The key is the item's stable name (`map_keys`): the image path relative to data.root without its
suffix, or "<split>/<scene>" for the synthetic scenes, so it does not depend on where the data set is mounted.

With hl.source=fixed the training run puts `AttachHLMap` in front of the train pipeline: the stored D is resized
bilinearly to the stored image's size, as the online branch resizes its D (hlbench/hardness.py), and from then on
it is a float map, which the pipeline resizes, crops and flips with the image (bilinear, never the label's nearest
rule) and no photometric step touches (hlbench/data/transforms.py). The batch carries it under "hl_map"; the loss
turns it into H with the online branch's own sigmoid + offset + normalisation (hardness.hardness_weights). This is
how the HL authors fed a stored map to Mask2Former (a map loaded with the image and split off after the geometric
steps, before PhotoMetricDistortion: their logs/mask2former configs).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from hlbench.data.bad_samples import BadSampleError, BadSampleLog, bad_sample_log
from hlbench.compose import SMOKE_PROFILE
from hlbench.data.transforms import Compose
from hlbench.errors import BadFileError, ConfigError, MissingInputError
from hlbench.models.heads import resize

log = logging.getLogger("hlbench")

HL_MAP_KEY = "hl_map"
# data.hl_map_dir=uniform: no folder, a constant map (D = 0, so h = 0.5 + offset everywhere) for every image. The
# stand-in a profile=smoke dry run uses where the experiment's folder holds no maps of the synthetic scenes.
UNIFORM = "uniform"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
MAP_SUFFIX = ".npy"
# The keys of a manifest that decide what a stored map is: two exports that differ in one of them must not mix in
# one folder, and a training run checks the data set's against its own.
IDENTITY_KEYS = ("format", "model", "checkpoint_sha256", "data", "resolution", "align_corners")

def uses_fixed_hl_map(hl_cfg) -> bool:
    """Whether the run's H comes from stored maps (hl.source=fixed on an HL run) rather than a learned HL branch."""
    return bool(hl_cfg.enabled) and hl_cfg.get("source", "online") == "fixed"


def data_identity(data_cfg) -> dict:
    """Which images a data config's training items are: its name, the train node (the on-disk split, or the synthetic
    scenes' size and domain) without the number of images, and the scenes' seed. Not where the files are (a moved
    data root keeps its maps), how samples are augmented, or how many there are (a subset keeps its maps)."""
    train = OmegaConf.to_container(data_cfg.train, resolve=True) if OmegaConf.is_config(data_cfg.train) \
        else dict(data_cfg.train)
    identity = {"name": data_cfg.name, "train": {k: v for k, v in sorted(train.items()) if k != "num_images"}}
    if data_cfg.get("scene_seed") is not None:
        identity["scene_seed"] = data_cfg.scene_seed
    return identity


def map_keys(dataset, data_cfg) -> list[str]:
    """The stable name of each item of a training data set, in index order (see the module doc)."""
    while hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    if hasattr(dataset, "scenes"):  # SyntheticStreets: a scene is named by its split and scene number
        return [f"{dataset.split}/{scene:05d}" for scene in dataset.scenes]
    if not hasattr(dataset, "pairs"):
        raise ConfigError(f"data.name={data_cfg.get('name')!r}: stored HL maps need a file data set or the "
                          f"synthetic scenes")
    root = Path(data_cfg.root).resolve()
    keys = []
    for image, _, _ in dataset.pairs:
        try:
            keys.append(Path(image).resolve().relative_to(root).with_suffix("").as_posix())
        except ValueError:
            raise ConfigError(f"data.root={data_cfg.root}: image {image} is outside it, so it has no stable map "
                              f"name") from None
    return keys


def read_manifest(folder) -> dict:
    """The manifest of a map folder; a one-line error naming it when it is absent or unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise MissingInputError(f"{path}: no such file; data.hl_map_dir must be a folder written by "
                                f"`python -m hlbench.hlmap export`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BadFileError(f"{path}: not a readable manifest ({err})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise BadFileError(f"{path}: manifest format {manifest.get('format')!r}; this hlbench reads {MANIFEST_FORMAT}")
    return manifest


def manifest_difference(old: dict, new: dict) -> list[str]:
    """The IDENTITY_KEYS on which two manifests differ."""
    return [k for k in IDENTITY_KEYS if old.get(k) != new.get(k)]


def read_stored_map(path: Path, image_hw: tuple[int, int]) -> np.ndarray:
    """The stored float16 D of an image of size `image_hw`; BadSampleError naming the file when it is missing,
    unreadable, not finite, or of a shape no export of this image gives (another image's map)."""
    try:
        stored = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise BadSampleError(path, "no stored HL map for this image (python -m hlbench.hlmap export writes it)") from None
    except (OSError, ValueError, EOFError) as err:
        raise BadSampleError(path, f"not a readable .npy HL map ({err})") from None
    if stored.ndim != 2 or stored.dtype != np.float16:
        raise BadSampleError(path, f"expected a 2-D float16 HL map, got shape {stored.shape} {stored.dtype}")
    (h, w), (mh, mw) = image_hw, stored.shape
    # An export keeps the image's aspect ratio up to the rounding of the test resize and of the strides: within
    # about a cell on each side, i.e. |mh - mw * h / w| <= 1.5 (1 + h / w).
    if abs(mh * w - mw * h) > 1.5 * (h + w):
        raise BadSampleError(path, f"a {mh}x{mw} HL map does not fit this {h}x{w} image: it was exported for "
                                   f"another image")
    if not np.isfinite(stored).all():
        raise BadSampleError(path, "the HL map holds non-finite values")
    return stored


class AttachHLMap:
    """Train-pipeline step put first by `attach_hl_maps`: sample["hl_map"] = the item's stored D, resized
    bilinearly (float32) to the image, as the online branch resizes its D."""

    def __init__(self, folder, keys: list[str], align_corners: bool):
        self.folder, self.keys, self.align_corners = Path(folder), list(keys), bool(align_corners)

    def path(self, index: int) -> Path:
        return self.folder / f"{self.keys[index]}{MAP_SUFFIX}"

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        hw = sample["img"].shape[:2]
        stored = torch.from_numpy(read_stored_map(self.path(sample["index"]), hw).astype(np.float32))
        out = dict(sample)
        out[HL_MAP_KEY] = resize(stored[None, None], hw, self.align_corners)[0, 0].numpy()
        return out


class AttachUniformMap:
    """Train-pipeline step for data.hl_map_dir=uniform: sample["hl_map"] = zeros of the image's size."""

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        return {**sample, HL_MAP_KEY: np.zeros(sample["img"].shape[:2], np.float32)}


def check_exported_for(folder: Path, manifest: dict, data_cfg) -> None:
    """A ConfigError naming the manifest when its maps were exported for other images than data_cfg's."""
    ours, theirs = data_identity(data_cfg), manifest["data"]
    if theirs != ours:
        differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise ConfigError(f"{folder / MANIFEST}: its maps were exported for other images (data keys {differ} "
                          f"differ: {[theirs.get(k) for k in differ]} there, {[ours.get(k) for k in differ]} here)")


def require_hl_maps(cfg, profile: str | None = None) -> None:
    """Before the first run of a suite: the map folder a fixed-map HL run needs exists and fits its data set.

    A missing folder is a MissingInputError with the command that writes it (hl.fixed_map.from_experiment names
    the HL experiment). Under profile=smoke, whose synthetic scenes no real export fits, a missing or unfitting
    folder is replaced by the uniform stand-in (data.hl_map_dir=uniform), said in a log line.
    """
    if not uses_fixed_hl_map(cfg.hl) or str(cfg.data.hl_map_dir) == UNIFORM:
        return
    folder = Path(cfg.data.hl_map_dir)
    exported = (folder / MANIFEST).is_file()
    if profile == SMOKE_PROFILE and not (exported and read_manifest(folder)["data"] == data_identity(cfg.data)):
        log.warning("profile=smoke: %s holds no maps of the synthetic scenes, so this dry run uses a uniform HL map "
                    "(data.hl_map_dir=uniform); data.hl_map_dir=<a smoke export> uses real ones", folder)
        OmegaConf.update(cfg, "data.hl_map_dir", UNIFORM)
        return
    if not exported:
        source = cfg.hl.fixed_map.get("from_experiment") or "<HL experiment>"
        raise MissingInputError(f"data.hl_map_dir={folder}: no exported HL maps there (no {MANIFEST}); write them "
                                f"with python -m hlbench.hlmap export experiment={source} hl.enabled=true "
                                f"checkpoint=<its best.pth> out={folder}")
    check_exported_for(folder, read_manifest(folder), cfg.data)


def attach_hl_maps(dataset, data_cfg) -> dict:
    """Give a training data set the stored maps of data.hl_map_dir (an AttachHLMap first in its pipeline) after
    checking that the folder was exported for this data set; returns the folder's manifest (data.hl_map_dir=uniform:
    a constant map for every image, no folder).

    A missing or mismatched map is then a bad sample (data.on_bad_sample): one line naming the file, or left out
    and counted. Generated scenes get a bad-sample log here, since their only file is the map.
    """
    base = dataset
    while hasattr(base, "dataset"):
        base = base.dataset
    if str(data_cfg.hl_map_dir) == UNIFORM:
        log.warning("data.hl_map_dir=uniform: every training image gets a constant HL map (D = 0), not a model's")
        base.transform = Compose([AttachUniformMap(), *base.transform.steps])
        return {"uniform": True}
    folder = Path(data_cfg.hl_map_dir)
    manifest = read_manifest(folder)
    check_exported_for(folder, manifest, data_cfg)
    base.transform = Compose([AttachHLMap(folder, map_keys(base, data_cfg), manifest["align_corners"]),
                              *base.transform.steps])
    if bad_sample_log(base) is None:
        base.bad_samples = BadSampleLog(data_cfg.get("on_bad_sample", "error"), size=len(base))
    return manifest
