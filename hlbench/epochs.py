"""Schedules declared in epochs, as U2PL and UniMatch declare them: `${epoch_iters:<n>}` is n epochs in iterations.

A recipe sets `train.epochs` and `train.epoch` (which list one epoch passes over, and whether the reference's loader
drops the last partial batch); `train.iters: ${epoch_iters:${train.epochs}}` and `train.eval_interval:
${epoch_iters:1}` then follow from the split's size, so a changed split list changes the schedule with it instead of
leaving hand-computed numbers behind. The reference's loaders pad each GPU's share to ceil(n / gpus) samples
(DistributedSampler), then batch it per GPU.
"""
from __future__ import annotations

import math

from omegaconf import OmegaConf

from .errors import ConfigError

RESOLVER = "epoch_iters"
STREAMS = ("labeled", "unlabeled")


def iterations_per_epoch(samples: int, gpus: int, per_gpu: int, drop_last: bool) -> int:
    """Iterations of one pass over `samples` items by `gpus` loaders of `per_gpu` images each."""
    per_rank = math.ceil(samples / gpus)
    return per_rank // per_gpu if drop_last else math.ceil(per_rank / per_gpu)


def epoch_iters(epochs, *, _root_) -> int:
    """`epochs` epochs of the run `_root_` in iterations (the `${epoch_iters:<epochs>}` resolver)."""
    from .data import split_record

    epoch = _root_.train.get("epoch")
    if epoch is None or epoch.get("stream") not in STREAMS:
        raise ConfigError(f"train.epoch.stream must be one of {STREAMS} where a schedule is given in epochs "
                          f"(${{{RESOLVER}:...}}), got {None if epoch is None else epoch.get('stream')!r}")
    record = split_record(_root_.data)
    if record is None:
        raise ConfigError(f"data.name={_root_.data.get('name')!r} has no labeled / unlabeled split: give "
                          "train.iters and train.eval_interval in iterations")
    reference = _root_.train.reference
    per_epoch = iterations_per_epoch(record[f"num_{epoch.stream}"], int(reference.gpus), int(reference.per_gpu),
                                     bool(epoch.drop_last))
    return int(epochs) * per_epoch


def register_resolvers() -> None:
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, epoch_iters)
