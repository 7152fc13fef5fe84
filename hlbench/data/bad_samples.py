"""Bad data files: one-line errors naming them, or, with `data.on_bad_sample=skip`, samples left out and counted.

A file data set (LabelledFiles, UnlabeledImages) raises BadSampleError from __getitem__ for a file it cannot use.
What happens then is decided outside it, by where the sample is read:
  training streams  `SeededSamples` loads the next index instead (deterministic: the bad index + 1, + 2, ...,
                    with the same augmentation seed) and tags the item with the files it passed over. The tag
                    travels through the DataLoader with the batch, so the main process learns of every skip,
                    whichever worker met it, and records it in the data set's BadSampleLog (error mode: raises
                    there, as one line, instead of inside a worker, where torch would wrap it in a traceback);
  evaluation        `LeaveOutBad` returns None for a bad item and the evaluator scores the others: a duplicate
                    would count an image twice, so nothing is substituted;
  listing           a listed file that does not exist (a split-list entry, an image without its label) is
                    dropped while the pairs are listed.
Counts are of distinct files per data set, and go into summary.json and the W&B summary (`bad_sample_report`).
"""
from __future__ import annotations

import logging

import torch.distributed as dist
from torch.utils.data import Dataset, default_collate

from hlbench.errors import ConfigError

log = logging.getLogger("hlbench")

ON_BAD_SAMPLE = ("error", "skip")
# A training item gives up after this many bad files in a row: a data set that broken needs fixing, not skipping.
MAX_CONSECUTIVE_BAD = 100
# Key of the (file, reason) pairs a training item passed over; it never reaches the training step.
SKIPPED_KEY = "bad_samples"
STOP_KEY = "bad_samples_stop"
_REPORTED_FILES = 100


class BadSampleError(ConfigError):
    """A data file that cannot be a sample (missing, corrupt, truncated, wrong mode, label values or size)."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


class BadSampleLog:
    """The bad files of one data set met so far by this process, with what data.on_bad_sample does about them.

    Args:
        mode: "error" (raise) or "skip" (record, warn once per file, go on).
        size: the data set's length; skipping every sample is an error in either mode.
    """

    def __init__(self, mode: str = "error", size: int | None = None):
        if mode not in ON_BAD_SAMPLE:
            raise ConfigError(f"data.on_bad_sample={mode!r} is not valid; expected one of {', '.join(ON_BAD_SAMPLE)}")
        self.mode, self.size, self.files = mode, size, {}

    @property
    def skipping(self) -> bool:
        return self.mode == "skip"

    def reject(self, path, reason: str) -> None:
        """A bad file: BadSampleError in error mode; in skip mode recorded (and a warning the first time)."""
        if not self.skipping:
            raise BadSampleError(path, reason)
        path = str(path)
        if path not in self.files:
            self.files[path] = reason
            log.warning("skipped %s: %s (data.on_bad_sample=skip; %d file(s) skipped so far)", path, reason,
                        len(self.files))
        if self.size is not None and len(self.files) >= self.size:
            raise BadSampleError(path, f"every one of the {self.size} samples of this data set is bad "
                                       "(data.on_bad_sample=skip needs at least one good one)")


def apply_bad_sample_policy(datasets: dict, mode: str) -> None:
    """Give every file data set of `datasets` a fresh log in data.on_bad_sample `mode` (generated data: none)."""
    for dataset in datasets.values():
        if (found := bad_sample_log(dataset)) is not None:
            base = dataset
            while hasattr(base, "dataset"):
                base = base.dataset
            base.bad_samples = BadSampleLog(mode, size=found.size)


def bad_sample_log(dataset) -> BadSampleLog | None:
    """The BadSampleLog of a file data set, through wrappers (Subset, SeededSamples); None for generated data."""
    while hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return getattr(dataset, "bad_samples", None)


class LeaveOutBad(Dataset):
    """Evaluation view of a data set: in skip mode a bad item is None, which the evaluator leaves out."""

    def __init__(self, dataset):
        self.dataset, self.log = dataset, bad_sample_log(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except BadSampleError as err:
            if self.log is None:
                raise
            self.log.reject(err.path, err.reason)
            return None


def load_or_substitute(load, index: int, size: int, log: BadSampleLog | None) -> dict:
    """`load(index)`, or in skip mode that of the next index that loads, tagged with the files passed over.

    In error mode, and after MAX_CONSECUTIVE_BAD bad files in a row, the item is a stop marker: the tag and
    STOP_KEY, which `record_skips` turns into the error in the main process.
    """
    passed = []
    for offset in range(min(size, MAX_CONSECUTIVE_BAD)):
        try:
            item = load((index + offset) % size)
        except BadSampleError as err:
            if log is None:
                raise
            passed.append((err.path, err.reason))
            if not log.skipping:
                return {SKIPPED_KEY: passed, STOP_KEY: err.reason}
            continue
        if passed:
            item[SKIPPED_KEY] = passed
        return item
    return {SKIPPED_KEY: passed, STOP_KEY: f"{len(passed)} bad files in a row from index {index}: the data set "
                                           "looks broken; run `python -m hlbench.data check`"}


def collate_tagged(items: list[dict]) -> dict:
    """default_collate of the items, their skip tags gathered under SKIPPED_KEY; a stop marker makes the batch one."""
    passed = [record for item in items for record in item.pop(SKIPPED_KEY, ())]
    stops = [item[STOP_KEY] for item in items if STOP_KEY in item]
    batch = {STOP_KEY: stops[0]} if stops else default_collate(items)
    if passed:
        batch[SKIPPED_KEY] = passed
    return batch


def record_skips(batch: dict, log: BadSampleLog) -> dict:
    """The batch without its skip tags, after recording them in `log` (error mode: the first one raises here)."""
    passed = batch.pop(SKIPPED_KEY, ())
    for path, reason in passed:
        log.reject(path, reason)
    if STOP_KEY in batch:
        raise BadSampleError(passed[-1][0], batch[STOP_KEY])
    return batch


def bad_sample_files(datasets: dict) -> dict[str, dict[str, str]]:
    """{split: {file: reason}} of the bad files met so far by every rank (checkpoints keep it across a resume).
    Under DDP every rank must call it (it gathers the ranks' logs)."""
    logs = {name: found for name, ds in datasets.items() if (found := bad_sample_log(ds)) is not None}
    files = {name: dict(found.files) for name, found in logs.items()}
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, files)
        files = {name: {path: reason for rank in gathered for path, reason in rank[name].items()} for name in logs}
    return files


def restore_bad_sample_files(datasets: dict, files: dict) -> None:
    """Put a checkpoint's bad_sample_files back into the data sets' logs (a resumed run keeps counting)."""
    for name, found in files.items():
        if name in datasets and (log := bad_sample_log(datasets[name])) is not None:
            log.files.update(found)


def bad_sample_report(datasets: dict) -> dict | None:
    """{"mode", "skipped", "per_split", "files": [{"split", "file", "reason"}] (first 100)} over every rank, or
    None where no data set reads files. Under DDP every rank must call it."""
    logs = [found for ds in datasets.values() if (found := bad_sample_log(ds)) is not None]
    if not logs:
        return None
    files = bad_sample_files(datasets)
    listed = [{"split": name, "file": path, "reason": reason} for name, found in files.items()
              for path, reason in sorted(found.items())]
    return {"mode": logs[0].mode, "skipped": len(listed),
            "per_split": {name: len(found) for name, found in files.items()}, "files": listed[:_REPORTED_FILES]}
