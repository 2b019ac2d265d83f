"""The budget accountant: the one clock the budget is counted on.

Every decision about the budget (planning, re-planning, checkpoints, the end of the run) reads counted
seconds from here, and the trainer's own timings (the probe, per-step compute on CPU) use its `now()`.
Other clocks in fastvit only measure and report: the loaders' data-wait timers, prep's progress.

Counted seconds are everything from the start of the process to the final checkpoint (loading,
compiling, probing, training, checkpointing) except periodic validation, which runs inside
`excluded()` and is reported on its own. A resumed run starts from the counted seconds stored in its
checkpoint: the time lost between that checkpoint and a crash is not counted (it bought nothing).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator


class BudgetClock:
    """Counted wall-clock seconds against a budget (seconds), with excluded intervals.

    `clock` is injectable so the planner and the loop can be tested with a fake clock.
    """

    def __init__(self, budget_s: float | None, counted_s: float = 0.0,
                 clock: Callable[[], float] = time.perf_counter):
        self.budget_s = budget_s
        self._clock = clock
        self._base = counted_s          # counted before this process (resume)
        self._t0 = clock()
        self._excluded = 0.0            # excluded seconds in this process
        self._excluded_total = 0.0      # all excluded seconds, for the report
        self._pause_t: float | None = None

    def now(self) -> float:
        """Raw clock reading (seconds): for timing spans that the caller then reports."""
        return self._clock()

    def counted(self) -> float:
        t = self._pause_t if self._pause_t is not None else self._clock()
        return self._base + (t - self._t0) - self._excluded

    @property
    def excluded_s(self) -> float:
        return self._excluded_total

    @contextmanager
    def excluded(self) -> Iterator[dict]:
        """Time spent inside is not counted (periodic validation). Yields a dict that holds the
        excluded seconds under 'seconds' once the block ends."""
        info = {"seconds": 0.0}
        if self._pause_t is not None:          # nested: the outer block already excludes
            yield info
            return
        t = self._clock()
        self._pause_t = t
        try:
            yield info
        finally:
            dt = self._clock() - t
            self._pause_t = None
            self._excluded += dt
            self._excluded_total += dt
            info["seconds"] = dt
