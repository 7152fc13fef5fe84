"""Training-stream sampling: endless, sharded, resumable at any sample, with per-sample augmentation seeds."""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from hlbench.data.transforms import worker_init_fn


class InfiniteShardedSampler(Sampler):
    """Endless reshuffled passes over the data set, sharded by rank, resumable at any sample.

    Yields (index, sample_seed): the seed makes each sample's augmentation a function of the run seed and the
    sample's position in the stream, independent of worker count and of where a run was resumed.
    """

    def __init__(self, size: int, seed: int, rank: int, world: int, start: int = 0):
        self.size, self.seed, self.rank, self.world, self.start = size, seed, rank, world, start
        self.per_rank = math.ceil(size / world)

    def __iter__(self):
        k = self.start
        while True:
            epoch, pos = divmod(k, self.per_rank)
            perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            perm = perm.repeat(math.ceil(self.per_rank * self.world / self.size))[: self.per_rank * self.world]
            for idx in perm[self.rank::self.world][pos:].tolist():
                yield idx, (self.seed * 1_000_003 + k * self.world + self.rank) % 2**32
                k += 1


class SeededSamples(torch.utils.data.Dataset):
    """Seeds every RNG an augmentation might use from the sampler's per-sample seed, then loads the sample."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        idx, seed = key
        # Forked so that with num_workers=0 the training process's own RNG stream (dropout) is untouched.
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            item = self.dataset[idx]
        random.setstate(py_state)
        np.random.set_state(np_state)
        return item


def stream_loader(dataset, per_device: int, *, seed: int, rank: int, world: int, start: int = 0,
                  workers: int = 0, pin_memory: bool = False):
    """An endless DataLoader over `dataset` for one training stream, starting at sample `start` of this rank."""
    sampler = InfiniteShardedSampler(len(dataset), seed, rank, world, start=start)
    return DataLoader(SeededSamples(dataset), batch_size=per_device, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=True, worker_init_fn=worker_init_fn,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                      generator=torch.Generator().manual_seed(seed))
