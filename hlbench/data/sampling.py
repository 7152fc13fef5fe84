"""Training-stream sampling: endless, sharded, resumable at any sample, with per-sample augmentation seeds."""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from hlbench.data.bad_samples import bad_sample_log, collate_tagged, load_or_substitute, record_skips
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
    """Seeds every RNG an augmentation might use from the sampler's per-sample seed, then loads the sample.

    A bad file's sample is replaced by the next good one with the same seed, or stops the run (data.on_bad_sample;
    see bad_samples.py), so the stream stays a function of the seed whatever the worker count.
    """

    def __init__(self, dataset):
        self.dataset, self.bad_samples = dataset, bad_sample_log(dataset)

    def __len__(self):
        return len(self.dataset)

    def _load(self, idx: int, seed: int) -> dict:
        # Forked so that with num_workers=0 the training process's own RNG stream (dropout) is untouched.
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                np.random.seed(seed)
                torch.manual_seed(seed)
                return self.dataset[idx]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def __getitem__(self, key):
        idx, seed = key
        return load_or_substitute(lambda i: self._load(i, seed), idx, len(self.dataset), self.bad_samples)


class _RecordedStream:
    """Iterates a stream's DataLoader in the main process, recording the bad files its items passed over."""

    def __init__(self, loader: DataLoader, log):
        self.loader, self.log = loader, log

    def __iter__(self):
        for batch in self.loader:
            yield batch if self.log is None else record_skips(batch, self.log)


def stream_loader(dataset, per_device: int, *, seed: int, rank: int, world: int, start: int = 0,
                  workers: int = 0, pin_memory: bool = False):
    """An endless DataLoader over `dataset` for one training stream, starting at sample `start` of this rank."""
    sampler = InfiniteShardedSampler(len(dataset), seed, rank, world, start=start)
    samples = SeededSamples(dataset)
    loader = DataLoader(samples, batch_size=per_device, sampler=sampler, num_workers=workers,
                        collate_fn=collate_tagged if samples.bad_samples is not None else None,
                        pin_memory=pin_memory, drop_last=True, worker_init_fn=worker_init_fn,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                        generator=torch.Generator().manual_seed(seed))
    return _RecordedStream(loader, samples.bad_samples)
