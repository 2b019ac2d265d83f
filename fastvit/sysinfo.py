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


# Dense bf16 matmul throughput (TFLOP/s) by GPU name, as the vendor's spec sheet gives it (no sparsity).
# Most specific names first: "H100 PCIe" before "H100". H200 and H100 SXM share the compute die and clocks.
SPEC_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "A100": 312.0}
# Measured by a bf16 matmul loop on the GPU itself (what MFU is measured against where known): 790 on an
# H200 (issue 16). Only the GPU it was measured on: the H100 takes its spec figure until `make gpu-check`
# (bench/gpu_check.py, part `peak`) measures one there; FASTVIT_PEAK_TFLOPS sets it for a run.
MEASURED_BF16_TFLOPS = {"H200": 790.0}
PEAK_BF16_TFLOPS = {k: MEASURED_BF16_TFLOPS.get(k, v) for k, v in SPEC_BF16_TFLOPS.items()}


def _lookup(table: dict, device_name: str) -> float | None:
    for key, tflops in table.items():
        if key in device_name:
            return tflops
    return None


def spec_tflops(device_name: str) -> float | None:
    """The spec sheet's dense bf16 TFLOP/s of this GPU (None: a CPU or an unlisted GPU)."""
    return _lookup(SPEC_BF16_TFLOPS, device_name)


def peak_flops(device_name: str) -> float | None:
    """FLOP/s that MFU divides by: FASTVIT_PEAK_TFLOPS, else the figure measured on that GPU model, else
    its spec-sheet figure; None where no peak is known (CPU, an unlisted GPU)."""
    env = os.environ.get("FASTVIT_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    tflops = _lookup(PEAK_BF16_TFLOPS, device_name)
    return None if tflops is None else tflops * 1e12
