"""Process-group setup from torchrun's environment and the global-batch plan."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Single process without a launcher; under `torchrun`, one process per device (NCCL on CUDA, gloo on CPU)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but torch.cuda.is_available() is False")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, local_rank, world, dev)


def plan_batch(global_batch: int, world_size: int, max_per_device: int) -> tuple[int, int]:
    """Split the recipe's global batch into (per-device batch, accumulation steps) keeping it exact.

    The lr and schedule of a recipe belong to its global batch, so the batch, not the lr, is what adapts to
    the number of devices.
    """
    if global_batch % world_size:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the world size {world_size}")
    share = global_batch // world_size
    for accum in range(1, share + 1):
        if share % accum == 0 and share // accum <= max_per_device:
            return share // accum, accum
    raise AssertionError("unreachable: accum = share always fits")


def all_reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Average logged scalars over ranks (mmseg logs the GPU mean of each loss)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float() for k in keys])
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    return dict(zip(keys, stacked))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
