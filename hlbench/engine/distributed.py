"""Process-group setup from torchrun's environment and the global-batch plan."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError


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
    """Single process without a launcher; under `torchrun`, one process per device (NCCL on CUDA, gloo on CPU).

    `device` is auto | cpu | cuda (checked with the run config)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"device=cuda, but this PyTorch ({torch.__version__}) finds no CUDA device; use device=cpu "
                          "or device=auto, or install a CUDA build of torch")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, local_rank, world, dev)


@dataclass(frozen=True)
class BatchPlan:
    """How each stream's global batch is laid out: world size x per-device batch x accumulation steps."""
    world_size: int
    accum: int
    global_batch: dict
    per_device: dict

    def as_dict(self) -> dict:
        return {"world_size": self.world_size, "accumulation": self.accum, "global": dict(self.global_batch),
                "per_device": dict(self.per_device)}


def plan_batches(streams: dict[str, tuple[int, str]], world_size: int, max_per_device: int) -> BatchPlan:
    """Split every stream's global batch ({name: (batch, config key)}) into per-device batches and one common
    number of accumulation steps, keeping each global batch exact.

    The lr and schedule of a recipe belong to its global batch, so the batch, not the lr, is what adapts to
    the number of devices. The accumulation count is the smallest that brings every share within
    `max_per_device` (train.max_batch_per_device) and divides every share.
    """
    shares = {}
    for name, (batch, key) in streams.items():
        if batch % world_size:
            raise ConfigError(f"{key}={batch} is not divisible by the world size {world_size}")
        shares[name] = batch // world_size
    for accum in range(1, max(shares.values()) + 1):
        if all(s % accum == 0 and s // accum <= max_per_device for s in shares.values()):
            return BatchPlan(world_size, accum, {n: b for n, (b, _) in streams.items()},
                             {n: s // accum for n, s in shares.items()})
    raise ConfigError(f"per-device batches {shares} have no common number of accumulation steps that fits "
                      f"train.max_batch_per_device={max_per_device}")


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


def broadcast_from_main(obj):
    """Rank 0's `obj` (picklable, e.g. the run folder it claimed) on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def host_group():
    """A process group for small agreements between ranks on the host (gloo), so that they never wait on the GPU
    stream; None in a single process. Every rank must call it (it creates a group under NCCL)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def any_rank(flag: bool, group) -> bool:
    """True on every rank when `flag` is true on any (group from host_group(); None: this process alone)."""
    if group is None:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())
