"""Pre-emption and Ctrl-C: SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT ask the train loop to checkpoint at the end of the
step and exit, for a requeue (or, after a Ctrl-C, for the user's resume=true).

SLURM sends SIGTERM to every process of a job before it kills it (and `--signal=USR1@<seconds>` sends SIGUSR1
that long before the time limit); the loop checks the request once per step, writes a checkpoint and exits
with REQUEUE_EXIT so that a launcher resubmits the job with resume=true. A launcher that handles the signal
itself keeps doing so, after the checkpoint: submitit (Hydra's submitit_slurm launcher) requeues its job on
SIGUSR2, and the requeued job, started with resume=true, continues the same run folder. A Ctrl-C (SIGINT) takes the
same path but exits with INTERRUPT_EXIT, so that no wrapper requeues what the user stopped; a second Ctrl-C quits at
once, without a checkpoint.
"""
from __future__ import annotations

import os
import signal
import threading

from ..errors import RunStopped

# sysexits.h EX_TEMPFAIL, "a temporary failure; the user is invited to retry": a requeue wrapper (slurm.conf
# RequeueExit=75, LSF `bsub -Q 75`, or a shell loop) resubmits on this status and on no other.
REQUEUE_EXIT = 75
# 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C.
INTERRUPT_EXIT = 130
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")
                     if hasattr(signal, name))


def stop_exit_status(signal_name: str | None) -> int:
    """The exit status of a run stopped by `signal_name`: INTERRUPT_EXIT for a Ctrl-C, REQUEUE_EXIT otherwise."""
    return INTERRUPT_EXIT if signal_name == "SIGINT" else REQUEUE_EXIT

_shield_forks = False


def _block_stop_signals_in_child() -> None:
    # DataLoader workers forked during training get the launcher's SIGTERM too (SLURM signals every process of
    # the job) and would die of it mid-step, taking the step down with them. Blocked here, the signal stays
    # pending in the worker; the training process ends its workers itself, and SIGKILL still ends everything.
    if _shield_forks:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_block_stop_signals_in_child)


class StopSignals:
    """While entered (main thread only): the STOP_SIGNALS record a stop request instead of killing the process;
    processes forked meanwhile (DataLoader workers) do not act on them. The previous handlers return on exit, and
    a Python one (a launcher's) is then called for the signal received, so that it can requeue the job."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        global _shield_forks
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            _shield_forks = True
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.received == "SIGINT":
                raise KeyboardInterrupt
            # os.write: a print here could re-enter a write the main thread was in the middle of.
            os.write(2, b"\ninterrupted: finishing the step and saving a checkpoint (Ctrl-C again quits without one)\n")
        self.received = self.received or signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        global _shield_forks
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        launcher = self._previous.get(signal.Signals[self.received]) if self.received else None
        self._previous.clear()
        _shield_forks = False
        # A run that stopped for the signal (not one that had finished): the launcher's own handler (not SIG_DFL or
        # SIG_IGN, nor Python's KeyboardInterrupt for SIGINT), now that the state is on disk.
        if isinstance(exc[1], RunStopped) and callable(launcher) and launcher is not signal.default_int_handler:
            launcher(signal.Signals[self.received], None)
