"""Data sets, train/test pipelines and on-device normalisation."""
from __future__ import annotations

import torch

from hlbench.data.ade20k import ADE20K, build_ade20k
from hlbench.data.cityscapes import Cityscapes, build_cityscapes
from hlbench.data.gta5 import GTA5, build_gta5_to_cityscapes
from hlbench.data.synthetic import SyntheticStreets, build_synthetic
from hlbench.data.transforms import build_test_pipeline, build_train_pipeline, sample_rng, worker_init_fn

__all__ = ["ADE20K", "DATASETS", "GTA5", "Cityscapes", "SyntheticStreets", "build_datasets", "build_test_pipeline", "build_train_pipeline",
           "normalize_batch", "sample_rng", "worker_init_fn"]

DATASETS = {"synthetic": build_synthetic, "cityscapes": build_cityscapes,
            "gta5_to_cityscapes": build_gta5_to_cityscapes, "ade20k": build_ade20k}


def build_datasets(data_cfg, seed: int) -> dict:
    """{"train": Dataset, "val": Dataset} for data_cfg.name; `seed` is the run seed (augmentation only)."""
    name = data_cfg.get("name") if data_cfg is not None else None
    if name not in DATASETS:
        raise ValueError(f"data.name={name!r} is not a known data set; valid names: {sorted(DATASETS)}")
    return DATASETS[name](data_cfg, seed)


def normalize_batch(img: torch.Tensor, mean, std, img_hw: torch.Tensor | None = None) -> torch.Tensor:
    """(img - mean) / std as float32 on img's device; pixels outside img_hw (N×2 [h, w]) set to exactly 0.

    mmseg pads after normalising, with 0 (the mean colour), so the padding must be 0 here too (datasets.md §5).
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
