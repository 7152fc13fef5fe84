"""Data sets, train/test pipelines and on-device normalisation."""
from __future__ import annotations

from pathlib import Path

import torch

from hlbench.data.ade20k import ADE20K, build_ade20k
from hlbench.data.bad_samples import apply_bad_sample_policy
from hlbench.data.decoded_cache import apply_decoded_cache
from hlbench.data.cityscapes import Cityscapes, build_cityscapes, build_cityscapes_semisup, cityscapes_split
from hlbench.data.gta5 import GTA5, build_gta5_to_cityscapes
from hlbench.data.isaid import build_isaid
from hlbench.data.semisup import Split, UnlabeledImages, read_split_list, shipped_splits
from hlbench.data.synthetic import (SyntheticStreets, build_synthetic, build_synthetic_semisup, stand_in_split,
                                    synthetic_split)
from hlbench.data.totaltext import build_totaltext
from hlbench.data.transforms import build_test_pipeline, build_train_pipeline, sample_rng, worker_init_fn
from hlbench.errors import ConfigError, MissingInputError
from hlbench.metrics import check_table_metric

__all__ = ["ADE20K", "DATASETS", "GTA5", "Cityscapes", "SEMISUP_SPLITS", "Split", "SyntheticStreets",
           "UnlabeledImages", "build_datasets", "build_test_pipeline", "build_train_pipeline", "normalize_batch",
           "read_split_list", "require_data_root", "sample_rng", "shipped_splits", "split_record", "worker_init_fn"]

DATASETS = {"synthetic": build_synthetic, "cityscapes": build_cityscapes,
            "gta5_to_cityscapes": build_gta5_to_cityscapes, "ade20k": build_ade20k,
            "cityscapes_semisup": build_cityscapes_semisup, "synthetic_semisup": build_synthetic_semisup,
            "isaid": build_isaid, "totaltext": build_totaltext}
# The semi-supervised data sets: data.name -> the function giving its Split (plain synthetic scenes have one only
# where they stand in for a semi-supervised data set, else None).
SEMISUP_SPLITS = {"cityscapes_semisup": cityscapes_split, "synthetic_semisup": synthetic_split,
                  "synthetic": stand_in_split}


# What a data config's root folders hold (README, Data sets), for the error that names a missing one.
_CITYSCAPES_LAYOUT = "leftImg8bit/{train,val}/<city>/ and gtFine/{train,val}/<city>/"
ROOT_LAYOUTS = {("cityscapes", "root"): _CITYSCAPES_LAYOUT, ("cityscapes_semisup", "root"): _CITYSCAPES_LAYOUT,
                ("gta5_to_cityscapes", "root"): "images/ and labels/",
                ("gta5_to_cityscapes", "cityscapes_root"): _CITYSCAPES_LAYOUT,
                ("ade20k", "root"): "images/{training,validation}/ and annotations/{training,validation}/",
                ("isaid", "root"): "img_dir/{train,val}/ and ann_dir/{train,val}/ (python -m hlbench.data "
                                   "prepare isaid)",
                ("totaltext", "root"): "images/{Train,Test}/ and annotations/{Train,Test}/ (python -m hlbench.data "
                                       "prepare totaltext)"}


def require_data_root(data_cfg) -> None:
    """A MissingInputError naming the first missing root folder of data_cfg, where to point it and what it holds."""
    for (name, key), layout in ROOT_LAYOUTS.items():
        root = data_cfg.get(key) if data_cfg.get("name") == name else None
        if root is not None and not Path(root).is_dir():
            raise MissingInputError(f"data.{key}={root}: no such folder; set HLBENCH_DATA to the folder holding "
                                    f"cityscapes/, gta/ and ade/ADEChallengeData2016/, or data.{key}=<folder>, laid "
                                    f"out as {layout}")


def build_datasets(data_cfg, seed: int) -> dict:
    """{"train": Dataset, "val": Dataset} for data_cfg.name; `seed` is the run seed (augmentation only).

    Semi-supervised data sets (SEMISUP_SPLITS) add "unlabeled", and their "train" is the labeled part of the split.
    data.on_bad_sample (error | skip) says what a bad file does (bad_samples.py).
    """
    name = data_cfg.get("name") if data_cfg is not None else None
    if name not in DATASETS:
        raise ConfigError(f"data.name={name!r} is not a known data set; valid names: {sorted(DATASETS)}")
    require_data_root(data_cfg)
    datasets = DATASETS[name](data_cfg, seed)
    check_table_metric(data_cfg.get("metric", "mIoU"), len(datasets["val"].classes))
    apply_bad_sample_policy(datasets, data_cfg.get("on_bad_sample", "error"))
    apply_decoded_cache(datasets, data_cfg.get("decoded_cache"))
    return datasets


def split_record(data_cfg) -> dict | None:
    """The identity of a semi-supervised data config's split (semisup.Split.record), None for other data sets.

    {"source": "u2pl/1_8" | <folder> | "seeded(<fraction>, <seed>)" [" for <shipped split>"], "labeled_sha256",
    "unlabeled_sha256", "num_labeled", "num_unlabeled"}. It reads the lists (or the train folder) but opens no image.
    """
    split_of = SEMISUP_SPLITS.get(data_cfg.get("name"))
    split = None if split_of is None else split_of(data_cfg)
    return None if split is None else split.record()


def normalize_batch(img: torch.Tensor, mean, std, img_hw: torch.Tensor | None = None) -> torch.Tensor:
    """(img - mean) / std as float32 on img's device; pixels outside img_hw (N×2 [h, w]) set to exactly 0.

    mmseg pads after normalising, with 0 (the mean colour), so the padding must be 0 here too (mmseg's Pad).
    """
    if img.dim() != 4 or img.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(f"normalize_batch expects N×C×H×W with C = len(mean) = len(std), got "
                         f"{tuple(img.shape)}, {len(mean)} means, {len(std)} stds")
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=img.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=img.device).view(1, -1, 1, 1)
    out = (img.float() - mean_t) / std_t
    if img_hw is None:
        return out
    hw = img_hw.to(img.device).view(-1, 2)
    rows = torch.arange(img.shape[2], device=img.device)[None, :] < hw[:, :1]
    cols = torch.arange(img.shape[3], device=img.device)[None, :] < hw[:, 1:]
    valid = rows[:, None, :, None] & cols[:, None, None, :]
    return out.masked_fill(~valid, 0.0)
