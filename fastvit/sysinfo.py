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


# Dense bf16 matmul throughput MFU is measured against, by GPU name. The H100/H200 figure is the one
# the project measures against (790 TFLOP/s measured on an H200; the SXM spec sheet says 989).
# FASTVIT_PEAK_TFLOPS overrides it (another GPU, or the spec-sheet number).
PEAK_BF16_TFLOPS = {"H200": 790.0, "H100": 790.0, "A100": 312.0}


def peak_flops(device_name: str) -> float | None:
    """FLOP/s that MFU divides by, or None where no peak is known (CPU, an unlisted GPU)."""
    env = os.environ.get("FASTVIT_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None
