"""The CPU cores this process may use, and the intra-op threads and loader workers chosen from them.

Counting the machine's cores oversubscribes a container or a SLURM allocation (affinity, cgroup quota), and so does
a machine shared with another job: there, each job's intra-op threads wait on threads the other job keeps off the
cores, and a step took 14x as long. So the counts come from the cores this process may use, less those other work
kept busy at start.
"""
from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class CpuPlan:
    cores: int          # cores this process may run on: affinity, capped by a cgroup CPU quota
    busy: float         # of those, the cores other work kept busy when the process started
    threads_env: bool   # OMP_NUM_THREADS is set: the user chose the threads

    @property
    def free(self) -> int:
        return max(1, self.cores - round(self.busy))

    @property
    def threads(self) -> int:
        return torch.get_num_threads() if self.threads_env else self.free

    def describe(self, workers: int, requested: int) -> str:
        why = "OMP_NUM_THREADS" if self.threads_env else "the free cores"
        capped = f" (train.num_workers={requested}, capped at the free cores)" if workers < requested else ""
        return (f"CPU: {self.cores} usable core(s) (affinity / cgroup quota), {self.busy:.1f} busy with other work at "
                f"start: {self.threads} intra-op thread(s) ({why}), {workers} loader worker(s) per stream{capped}")


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores of this process's CPU affinity, capped by its cgroup's CPU quota (rounded up)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup's CPU quota in cores (cgroup v2 cpu.max, else v1 cfs_quota / cfs_period); None without one."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 else None


def busy_cores(stat_before: str, stat_after: str, cpus) -> float:
    """Cores of `cpus` that were busy between two readings of /proc/stat (sum of each core's busy fraction)."""
    def times(text):
        rows = (line.split() for line in text.splitlines() if line.startswith("cpu") and line[3:4].isdigit())
        return {int(row[0][3:]): [int(v) for v in row[1:]] for row in rows}

    before, after = times(stat_before), times(stat_after)
    busy = 0.0
    for cpu in cpus:
        if cpu not in before or cpu not in after:
            continue
        delta = [b - a for a, b in zip(before[cpu], after[cpu])]
        total = sum(delta[:8])  # user nice system idle iowait irq softirq steal (guest time is within user)
        if total > 0:
            busy += 1 - (delta[3] + delta[4]) / total
    return busy


@functools.cache
def cpu_plan(sample_s: float = 0.3) -> CpuPlan:
    """This process's CpuPlan, measured once (while the process sleeps, so that its own work is not counted)."""
    cores = usable_cores()
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    try:
        before = Path("/proc/stat").read_text()
        time.sleep(sample_s)
        busy = min(float(cores), busy_cores(before, Path("/proc/stat").read_text(), cpus))
    except OSError:  # no /proc (not Linux): nothing known about other work
        busy = 0.0
    return CpuPlan(cores, busy, bool(os.environ.get("OMP_NUM_THREADS")))


def set_intra_op_threads() -> CpuPlan:
    """Command-line entry points: torch's intra-op threads from cpu_plan() (OMP_NUM_THREADS, if set, wins)."""
    plan = cpu_plan()
    if not plan.threads_env:
        torch.set_num_threads(plan.threads)
    return plan


def loader_workers(requested: int, streams: int, free: int) -> int:
    """Loader workers per stream: `requested`, capped so that all streams' together fit in the `free` cores."""
    return min(requested, max(1, free // max(1, streams))) if requested > 0 else 0
