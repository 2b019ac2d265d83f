"""Facts about the machine this process runs on, for every part of fastvit (prep, loaders, trainer, bench)."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def default_workers(workers: int | None = None) -> int:
    """`workers`, else the cores this process may use (its CPU affinity, not the machine's count)."""
    if workers:
        return int(workers)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
