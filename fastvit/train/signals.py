"""SIGTERM, what SLURM and Kubernetes send before they kill a job: a checkpoint within seconds, then exit 143.

`TermGuard` owns the SIGTERM handler for the length of `train()` (the previous handler is restored when
it returns). In the training loop a SIGTERM only sets a flag: the step in flight finishes, the loop sees
`guard.requested`, writes a checkpoint and raises `Terminated`. Elsewhere (set-up, compile and probe,
validation) nothing would look at the flag for a long time, so the handler raises `Terminated` at once;
the trainer then writes a checkpoint if it has trained anything since the last one. Either way the exit
code is 143 (128 + SIGTERM, the shell's and the schedulers' convention) and a requeued job continues
with --resume.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from .errors import TrainError

EXIT_TERMINATED = 128 + signal.SIGTERM      # 143


class Terminated(TrainError):
    """A SIGTERM ended the run (exit 143); the message says what was kept (`bare`: not said yet, the
    handler's own)."""

    def __init__(self, msg: str | None = None):
        super().__init__(msg or "terminated", EXIT_TERMINATED)
        self.bare = msg is None


class TermGuard:
    def __init__(self):
        self.requested = False
        self._deferred = False
        self._previous = None
        self._installed = False

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if not self._deferred:
            raise Terminated()

    def install(self) -> "TermGuard":
        # signal handlers belong to the main thread; train() run from another thread keeps the default
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    @contextmanager
    def deferring(self, on: bool = True):
        """Inside (on): a SIGTERM only sets `requested`, for the loop to check after each step, and a
        checkpoint write is never cut short; (off) it raises `Terminated` at once (validation)."""
        previous, self._deferred = self._deferred, on
        try:
            yield self
        finally:
            self._deferred = previous
