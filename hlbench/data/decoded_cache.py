"""Decode once (data.decoded_cache=<folder>): each image and label file is decoded to a uint8 .npy the first time
it is read, and read back from that file afterwards.

PNG decoding is most of a Cityscapes sample's CPU time (about 28 of 40 ms for a 2048×1024 image and its label on
one core); reading the decoded array back costs well under a millisecond from the page cache, so the same core
feeds about twice the samples. The pixels are the decoder's, so every augmentation sees exactly what it would
without the cache. The price is disk: the decoded Cityscapes train split takes ~25 GB (6.3 MB per image, 2.1 MB
per label).

An entry is named by the file's absolute path, size and modification time, so an edited file is decoded again;
entries are written atomically, so DataLoader workers racing on one file leave one whole entry. A file that
fails its checks (bad_samples.py) is never cached.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from hlbench.atomic_files import atomic_write
from hlbench.errors import ConfigError


class DecodedCache:
    """The decoded arrays of the files `read(reader, path)` was asked for, in `folder`."""

    def __init__(self, folder):
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"data.decoded_cache={folder}: cannot create the folder ({err.strerror})") from None

    def entry(self, reader, path) -> Path:
        stat = os.stat(path)
        key = f"{reader.__module__}.{reader.__qualname__}|{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        return self.folder / f"{hashlib.sha1(key.encode()).hexdigest()}.npy"

    def read(self, reader, path) -> np.ndarray:
        """reader(path), decoded at most once: later calls load the cached array."""
        try:
            entry = self.entry(reader, path)
        except FileNotFoundError:
            return reader(path)  # the reader names the missing file
        try:
            return np.load(entry)
        except (FileNotFoundError, ValueError, EOFError, OSError):  # absent, or not a whole .npy
            pass
        array = reader(path)
        atomic_write(entry, lambda tmp: np.save(tmp, array))
        return array


def read_through(cache: DecodedCache | None, reader, path) -> np.ndarray:
    """reader(path), through `cache` when there is one."""
    return reader(path) if cache is None else cache.read(reader, path)


def apply_decoded_cache(datasets: dict, folder) -> None:
    """Give every file data set of `datasets` the cache in `folder` (None: decode every time)."""
    cache = DecodedCache(folder) if folder else None
    for dataset in datasets.values():
        while hasattr(dataset, "dataset"):
            dataset = dataset.dataset
        if hasattr(dataset, "decoded"):
            dataset.decoded = cache
