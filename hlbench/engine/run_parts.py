"""A run built from its config: seeds, data, model, method, batch plan and optimiser, in that order (RunParts).

The order is part of reproducibility: every rank seeds its generators first, so the data sets, the model's
initial weights and the method's state draw the same numbers in every run of the same seed.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
import torch

from ..data import build_datasets, split_record
from ..data.files import check_mapped_labels
from ..data.hl_maps import attach_hl_maps, uses_fixed_hl_map
from ..methods import Method, Stream, build_method
from ..models import build_model
from .distributed import BatchPlan, DistInfo, plan_batches
from .optim import build_optimizer
from .param_groups import describe_groups
from .precision import allow_tf32

log = logging.getLogger("hlbench")


@dataclass
class RunParts:
    """What one run trains and evaluates.

    Args:
        datasets: {"train", "val"} and, for semi-supervised data, "unlabeled".
        split: the labeled / unlabeled partition of semi-supervised data (None otherwise), as env.json records it.
        classes, palette: the data set's class names and colours.
        model: on its device, BatchNorm converted for the world size, channels-last where asked.
        streams: the method's data streams and their global batches; plan: how they are laid out on the devices.
    """
    datasets: dict
    split: dict | None
    classes: list[str]
    palette: list | None
    model: torch.nn.Module
    method: Method
    streams: dict[str, Stream]
    plan: BatchPlan
    optimizer: torch.optim.Optimizer

    @property
    def val_set(self):
        return self.datasets["val"]


def uses_channels_last(cfg, device: torch.device) -> bool:
    return bool(cfg.train.channels_last) and device.type == "cuda"


def build_run(cfg, info: DistInfo) -> RunParts:
    """Seed this rank (seed + rank), then build data, model, method, the batch plan and the optimiser."""
    torch.manual_seed(cfg.seed + info.rank)
    np.random.seed(cfg.seed + info.rank)
    random.seed(cfg.seed + info.rank)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.train.cudnn_benchmark)
        allow_tf32(cfg.train.tf32)

    datasets = build_datasets(cfg.data, cfg.seed)
    if uses_fixed_hl_map(cfg.hl):
        attach_hl_maps(datasets["train"], cfg.data)
    check_mapped_labels(datasets["val"])
    classes = list(datasets["train"].classes)
    model = build_model(cfg.model, num_classes=len(classes), hl=cfg.hl, weights_dir=cfg.weights_dir)
    model = _convert_norm(model, cfg.train.norm, info).to(info.device)
    if uses_channels_last(cfg, info.device):
        model = model.to(memory_format=torch.channels_last)
    method = build_method(cfg)
    streams = method.streams(datasets)
    plan = plan_batches({name: (s.batch_size, s.key) for name, s in streams.items()}, info.world_size,
                        cfg.train.max_batch_per_device)
    method.setup(model, plan)
    groups = method.param_groups(model)
    log.info("optimiser param groups: %s", describe_groups(groups))
    optimizer = build_optimizer(groups, cfg.optim)
    return RunParts(datasets=datasets, split=split_record(cfg.data), classes=classes,
                    palette=datasets["train"].palette, model=model, method=method, streams=streams,
                    plan=plan, optimizer=optimizer)


def _convert_norm(model, norm: str, info: DistInfo):
    if norm == "syncbn":
        if info.device.type == "cuda" and info.world_size > 1:
            return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        log.info("train.norm=syncbn: world size %d on %s, falling back to BatchNorm", info.world_size,
                 info.device.type)
    return model
