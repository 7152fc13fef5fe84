"""The data-loading benchmark: decoded + augmented train items per second per core (`python -m hlbench.data bench`,
and the training-speed benchmark's `--loader` rows)."""
from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf

from hlbench.data import ADE20K, GTA5, Cityscapes
from hlbench.data.decoded_cache import DecodedCache
from hlbench.data.transforms import build_train_pipeline, worker_init_fn

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
# Data set name -> (train set from a root and a transform, data config whose train_pipeline `bench` uses).
BENCH = {"cityscapes": (lambda root, t: Cityscapes(root, "train", t), "cityscapes_769"),
         "gta5": (lambda root, t: GTA5(root, t), "gta5_to_cityscapes"),
         "ade20k": (lambda root, t: ADE20K(root, "train", t), "ade20k_512")}


def loader_rate(name: str, root, n: int, config: str | None = None, decoded_cache=None) -> float:
    """Decoded + augmented train items per second in this process, one thread (a DataLoader worker's setup).

    With `decoded_cache` (a folder) every file is decoded into it first, untimed: the rate is the steady state of
    every epoch after the first."""
    make, default = BENCH[name]
    data_cfg = OmegaConf.load(CONF / f"{config or default}.yaml")
    worker_init_fn(0)
    dataset = make(root, build_train_pipeline(data_cfg.train_pipeline))
    if decoded_cache:
        dataset.decoded = DecodedCache(decoded_cache)
        for i in range(len(dataset)):
            dataset[i]
    dataset[0]  # warm-up: first-call allocations and imports
    start = time.perf_counter()
    for i in range(n):
        dataset[(i + 1) % len(dataset)]
    return n / (time.perf_counter() - start)
