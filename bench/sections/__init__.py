"""Benchmark sections: each module `<name>.py` has `run(ctx: Context) -> dict[str, float]`."""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"


class SectionSkipped(Exception):
    """Raised by a section that cannot run on this machine; the message says why."""


@dataclass
class Context:
    quick: bool = False
    data: str | None = None
    src: str | None = None
    device: str = "cpu"
    workers: int = 1
    scratch: Path = field(default_factory=lambda: Path(os.environ.get("FASTVIT_BENCH_SCRATCH", "/tmp/fastvit-bench")))
    # per-run overrides of a section's sizes (bench/gpu_check.py: real GPU sizes with fewer compiles, or
    # tiny CPU sizes); each section documents the keys it reads
    opts: dict = field(default_factory=dict)
    # a file the section's metrics so far are written to after each measurement (a section killed by
    # its time box still leaves what it measured); None: not written
    partial: Path | None = None
    _notes: dict = field(default_factory=dict)

    @classmethod
    def from_args(cls, args) -> "Context":
        from fastvit.data.backends import default_device
        from fastvit.sysinfo import default_workers

        device = args.device or default_device()
        return cls(quick=args.quick, data=args.data, src=args.src, device=device,
                   workers=default_workers(args.workers))

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def skip(self, metric: str, why: str) -> None:
        """Record that one metric of a section was not measured here, and why."""
        self._notes[metric] = why

    def save_partial(self, metrics: dict) -> None:
        """Write the metrics measured so far (and the notes) to `partial`, atomically."""
        if self.partial is not None:
            from fastvit.fileio import write_json_atomic

            write_json_atomic(Path(self.partial), {"metrics": metrics, "skipped": dict(self._notes)})

    def pop_notes(self) -> dict:
        notes, self._notes = self._notes, {}
        return notes

    def workdir(self, name: str) -> Path:
        d = self.scratch / name
        d.mkdir(parents=True, exist_ok=True)
        return d


def timeit(fn: Callable[[], object], *, warmup: int = 1, iters: int = 5, sync: Callable[[], None] | None = None) -> float:
    """Median seconds per call of fn() after warmup (sync() is called around each timed call on GPU)."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
