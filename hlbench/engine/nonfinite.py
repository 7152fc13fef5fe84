"""The non-finite guard: a NaN or inf loss never reaches a log line, an evaluation or a checkpoint.

Off (train.skip_nonfinite=0), the logged values of a window of steps are checked at the next log point,
evaluation or checkpoint, in one host transfer, and the run stops naming the first bad value and the last good
checkpoint. With train.skip_nonfinite=K, each step's values are checked before its update (one sync per step) and
up to K bad steps are skipped.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from ..errors import RunStopped
from .distributed import any_rank

log = logging.getLogger("hlbench")


class NonFiniteGuard:
    """Args:
        skip_limit: train.skip_nonfinite.
        host_group: the ranks' agreement group (distributed.host_group()).
        last_good: names the last good checkpoint, for the messages.
        skipped: iterations already skipped (restored on resume).
    """

    def __init__(self, skip_limit: int, host_group, last_good: Callable[[], str], skipped=()):
        self.skip_limit, self.host_group, self.last_good = skip_limit, host_group, last_good
        self.skipped: list[int] = list(skipped)

    def skip(self, it: int, step: dict, states: list) -> bool:
        """True (no update) when a logged value of step `it` is not finite, up to skip_limit times in the run; a
        RunStopped beyond that, or when the bad values reached `states` (BatchNorm statistics, a method's state),
        which a skip cannot restore."""
        if not self.skip_limit:
            return False
        bad = first_nonfinite([(it, step)])
        if not any_rank(bad is not None, self.host_group):
            return False
        self.skipped.append(it)
        what = terms(bad[1]) if bad else "on another rank"
        if len(self.skipped) > self.skip_limit:
            raise RunStopped(f"non-finite loss at iteration {it} ({what}): more than train.skip_nonfinite="
                             f"{self.skip_limit} steps skipped (iterations {self.skipped}); {self.last_good()}")
        if any_rank(not all_finite(states), self.host_group):
            raise RunStopped(f"non-finite loss at iteration {it} ({what}) reached the BatchNorm statistics or the "
                             f"method's state, which skipping the update cannot undo; {self.last_good()}")
        log.warning("non-finite loss at iteration %d (%s): update skipped (%d of train.skip_nonfinite=%d)", it,
                    what, len(self.skipped), self.skip_limit)
        return True

    def check(self, steps: list[tuple[int, dict]]) -> None:
        """A RunStopped naming the first non-finite logged value of `steps` [(iteration, logs)], so that nothing
        uses what it produced; the last good checkpoint stays the newest."""
        bad = first_nonfinite(steps)
        if any_rank(bad is not None, self.host_group):
            where = f"at iteration {bad[0]} ({terms(bad[1])})" if bad else "on another rank"
            raise RunStopped(f"non-finite loss {where}; stopped without saving: {self.last_good()}; "
                             f"train.skip_nonfinite=K would skip up to K such steps")


def first_nonfinite(steps: list[tuple[int, dict]]) -> tuple[int, dict] | None:
    """(iteration, {key: value}) of the first step with a non-finite logged value, or None; one host transfer."""
    if not steps:
        return None
    flat = iter(torch.stack([v for _, logs in steps for v in logs.values()]).tolist())
    for it, logs in steps:
        bad = {k: v for k, v in zip(logs, flat) if not math.isfinite(v)}
        if bad:
            return it, bad
    return None


def terms(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def all_finite(state) -> bool:
    """Whether every floating-point tensor in nested dicts and lists (state dicts) is finite."""
    if torch.is_tensor(state):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    return True
