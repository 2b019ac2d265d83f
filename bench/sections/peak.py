"""bench section 'peak': the dense matmul throughput this machine reaches, measured before anything else.

GPU: bf16 (n x n) @ (n x n) into a preallocated output, n = 8192, timed with CUDA events over batches of
10 launches until `seconds` (default 10) have passed, after a warm-up. FLOPs = 2 n^3 per matmul.
  peak/bf16_matmul_tflops       measured: what MFU is computed against (bench/gpu_check.py passes it on
                                as FASTVIT_PEAK_TFLOPS to the later parts and to the e2e trainer)
  peak/spec_bf16_tflops         the spec sheet's dense bf16 figure of this GPU (fastvit.sysinfo), beside it
  peak/measured_over_spec
CPU: the same loop in fp32 at n = 512 for `seconds` (default 1) -> peak_cpu/fp32_matmul_gflops (a CPU
number; the GPU keys are skipped with a reason).
ctx.opts: "seconds", "n".
"""
from __future__ import annotations

import time


def run(ctx) -> dict[str, float]:
    import torch

    from fastvit.sysinfo import spec_tflops

    out: dict[str, float] = {}
    if not ctx.cuda:
        n, seconds = ctx.opts.get("n", 512), ctx.opts.get("seconds", 1.0)
        a, b = torch.randn(n, n), torch.randn(n, n)
        c = torch.empty(n, n)
        torch.matmul(a, b, out=c)
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.matmul(a, b, out=c)
            count += 1
        out["peak_cpu/fp32_matmul_gflops"] = 2 * n ** 3 * count / (time.perf_counter() - t0) / 1e9
        for k in ("peak/bf16_matmul_tflops", "peak/spec_bf16_tflops", "peak/measured_over_spec"):
            ctx.skip(k, "needs a CUDA GPU (the CPU run measures peak_cpu/fp32_matmul_gflops instead)")
        return out
    dev = torch.device(ctx.device)
    n, seconds = ctx.opts.get("n", 8192), ctx.opts.get("seconds", 10.0)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(5):                                   # cuBLAS heuristics, clocks up
        torch.matmul(a, b, out=c)
    torch.cuda.synchronize(dev)
    total_ms, count, t0 = 0.0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            torch.matmul(a, b, out=c)
        end.record()
        end.synchronize()
        total_ms += start.elapsed_time(end)
        count += 10
    tflops = 2 * n ** 3 * count / (total_ms * 1e-3) / 1e12
    out["peak/bf16_matmul_tflops"] = tflops
    spec = spec_tflops(torch.cuda.get_device_name(dev))
    if spec:
        out["peak/spec_bf16_tflops"] = spec
        out["peak/measured_over_spec"] = tflops / spec
    else:
        ctx.skip("peak/spec_bf16_tflops", f"no spec figure for {torch.cuda.get_device_name(dev)} in fastvit.sysinfo")
    out["peak/matmul_seconds"] = total_ms * 1e-3
    return out
