"""Honest busy share: a torch.profiler window over a few hundred steps of every stage.

    win = BusyWindow(steps=200, skip=20, cuda=True)   # --profile-steps 200
    win.new_stage(stage)          # at every stage change (the loop's)
    win.step_done()               # after every training step; returns a record when a window closes

CUDA timing events around each step's launches say how long the GPU took from a step's first kernel to
its last, so a host stall inside a step (a sync, a slow launch) counts as busy. A profiler window says
what the GPU actually did: busy = the union of the intervals in which a CUDA kernel (or memcpy/memset)
ran, over the host wall time of the same steps, both measured between two synchronizations (the only
SYNCs this adds, two per stage, only when --profile-steps > 0). The window opens after `skip` steps of
a stage (its compile, loader switch and first batches stay out) and spans `steps` steps, or fewer when
the stage ends first (then it closes at the stage change, over the steps it saw).

On a CPU run the same window measures the share of wall time the host spent inside torch operators
(`kind="cpu_ops"`): a CPU number, never a GPU one.

The windows are quiet: libkineto logs `USDT: ... profiler_start` / `profiler_stop` (and STAGE lines) to
stderr at every window otherwise; KINETO_LOG_LEVEL is set to QUIET_KINETO_LEVEL before the first window
(kineto reads it when the profiler first starts) unless the user set it.
"""
from __future__ import annotations

import os
import time

import torch

METHOD_CUDA = ("torch.profiler window per stage: union of CUDA kernel/memcpy/memset intervals / host wall "
               "time of the same steps (synchronized at both ends)")
METHOD_CPU = "torch.profiler window per stage: union of CPU operator intervals / host wall time (CPU run)"
# above every libkineto log level (VERBOSE 0 .. ERROR 3, STAGE 4, USDT 5): nothing is printed
QUIET_KINETO_LEVEL = "6"


def quiet_profiler() -> None:
    """Silence libkineto's per-window log lines for this process (a user's KINETO_LOG_LEVEL wins)."""
    os.environ.setdefault("KINETO_LOG_LEVEL", QUIET_KINETO_LEVEL)


def union_seconds(intervals) -> float:
    """Total length of the union of [start, end) intervals (any unit in, the same unit out)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def device_intervals_us(prof, cuda: bool) -> list[tuple[float, float]]:
    """[start, end) in microseconds of every device activity (cuda: kernels, memcpy, memset) or every CPU
    operator (cpu), from the profiler's raw (kineto) events; the FunctionEvent list when those are not
    available (older torch)."""
    from torch.autograd import DeviceType

    want = DeviceType.CUDA if cuda else DeviceType.CPU
    out = []
    try:
        for e in prof.profiler.kineto_results.events():
            if e.device_type() == want and e.duration_ns() > 0:
                out.append((e.start_ns() / 1e3, (e.start_ns() + e.duration_ns()) / 1e3))
        return out
    except AttributeError:
        pass
    for e in prof.events():
        if e.device_type == want and e.time_range.end > e.time_range.start:
            out.append((float(e.time_range.start), float(e.time_range.end)))
    return out


class BusyWindow:
    def __init__(self, steps: int, skip: int, cuda: bool):
        self.steps, self.skip, self.cuda = int(steps), int(skip), cuda
        self.records: list[dict] = []
        self._stage = None
        self._n = 0
        self._prof = None
        self._t0 = 0.0

    @property
    def method(self) -> str:
        return METHOD_CUDA if self.cuda else METHOD_CPU

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()                                                     # SYNC (profile window only)

    def new_stage(self, stage) -> dict | None:
        rec = self._close()
        self._stage, self._n = stage, 0
        if self.steps > 0 and self.skip == 0:
            self._open()
        return rec

    def step_done(self) -> dict | None:
        if self.steps <= 0 or self._stage is None:
            return None
        self._n += 1
        if self._prof is None and self._n == self.skip:
            self._open()
        elif self._prof is not None and self._n >= self.skip + self.steps:
            return self._close()
        return None

    def _open(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CUDA] if self.cuda else [ProfilerActivity.CPU]
        quiet_profiler()
        self._sync()
        self._prof = profile(activities=acts)
        self._prof.__enter__()
        self._t0 = time.perf_counter()
        self._steps_at_open = self._n

    def _close(self) -> dict | None:
        if self._prof is None:
            return None
        self._sync()
        wall = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        busy_s = union_seconds(device_intervals_us(prof, self.cuda)) / 1e6
        st = self._stage
        rec = {"kind": "profile", "res": st.res, "keep": st.keep, "batch": st.batch_size,
               "profiled_steps": self._n - self._steps_at_open, "wall_s": round(wall, 6),
               "busy_s": round(busy_s, 6), "busy": round(busy_s / wall, 4) if wall > 0 else None,
               "what": "cuda_kernels" if self.cuda else "cpu_ops"}
        self.records.append(rec)
        return rec

    def close(self) -> dict | None:
        """Close an open window (the run ended inside it)."""
        return self._close()
