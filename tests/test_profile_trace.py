"""BusyWindow's GPU branch (fastvit.train.profile) on a recorded profiler trace, with no GPU: the window's
profiler is replaced by one that replays tests/fixtures/kineto_trace_cuda.json (a kineto Chrome trace of
one window: host ops and launches, kernels on two overlapping streams, a memcpy and a memset) through
the same `kineto_results.events()` interface torch.profiler gives; CUDA syncs are counted, the wall
clock is scripted. And the profiler windows print nothing (libkineto's USDT/STAGE lines are silenced)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

import fastvit.train.profile as P
from fastvit.stage import Stage

TRACE = Path(__file__).resolve().parent / "fixtures" / "kineto_trace_cuda.json"
DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}      # kineto's device-side activity categories


class _Event:
    def __init__(self, e: dict):
        self._e = e

    def device_type(self):
        return DeviceType.CUDA if self._e["cat"] in DEVICE_CATS else DeviceType.CPU

    def start_ns(self) -> int:
        return int(round(self._e["ts"] * 1e3))

    def duration_ns(self) -> int:
        return int(round(self._e["dur"] * 1e3))


class ReplayProfile:
    """Stands in for torch.profiler.profile: records the activities it was asked for and, once exited,
    gives the trace's complete ("X") events as kineto events."""
    made: list = []

    def __init__(self, activities):
        self.activities = list(activities)
        self.entered = self.exited = False
        ReplayProfile.made.append(self)

    def __enter__(self):
        self.entered = True
        return self

    def __exit__(self, *exc):
        self.exited = True
        events = [_Event(e) for e in json.loads(TRACE.read_text())["traceEvents"] if e.get("ph") == "X"]
        self.profiler = SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: events))
        return False


@pytest.fixture
def replay(monkeypatch):
    import torch.profiler

    ReplayProfile.made = []
    syncs = []
    monkeypatch.setattr(torch.profiler, "profile", ReplayProfile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(1))
    clock = iter(10.0 + 0.0025 * i for i in range(100))              # each window's wall time: 2.5 ms
    monkeypatch.setattr(P, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    return syncs


def test_trace_fixture_union_is_what_its_comment_says():
    ev = json.loads(TRACE.read_text())["traceEvents"]
    dev = [(e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("ph") == "X" and e["cat"] in DEVICE_CATS]
    assert len(dev) == 5 and P.union_seconds(dev) == pytest.approx(310.0)
    host = [(e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("ph") == "X" and e["cat"] not in DEVICE_CATS]
    assert P.union_seconds(host) > 900                              # the sync alone: host time is not GPU busy


def test_gpu_window_busy_is_the_kernel_union_over_the_synced_wall_time(replay):
    win = P.BusyWindow(steps=3, skip=1, cuda=True)
    assert win.method == P.METHOD_CUDA
    stage = Stage(224, 256, keep=0.5)
    assert win.new_stage(stage) is None
    recs = [win.step_done() for _ in range(4)]                       # skip 1, then a window of 3 steps
    assert recs[:3] == [None, None, None] and recs[3] is not None
    [prof] = ReplayProfile.made
    assert prof.activities == [torch.profiler.ProfilerActivity.CUDA] and prof.entered and prof.exited
    assert len(replay) == 2                                          # one sync at each end of the window
    rec = recs[3]
    assert rec["what"] == "cuda_kernels" and rec["kind"] == "profile"
    assert (rec["res"], rec["keep"], rec["batch"], rec["profiled_steps"]) == (224, 0.5, 256, 3)
    assert rec["busy_s"] == pytest.approx(310e-6) and rec["wall_s"] == pytest.approx(0.0025)
    assert rec["busy"] == pytest.approx(round(310e-6 / 0.0025, 4))   # 0.124: host-bound window
    assert win.records == [rec] and win.close() is None               # nothing open any more


def test_gpu_window_closed_by_the_stage_change_reports_the_steps_it_saw(replay):
    win = P.BusyWindow(steps=200, skip=0, cuda=True)
    win.new_stage(Stage(64, 1024))                                   # skip 0: opens at once
    for _ in range(5):
        assert win.step_done() is None
    rec = win.new_stage(Stage(128, 784))                             # the stage ends first
    assert rec["res"] == 64 and rec["profiled_steps"] == 5 and rec["busy_s"] == pytest.approx(310e-6)


def test_profiler_windows_print_no_kineto_lines(tmp_path):
    """What `make demo` showed: a USDT profiler_start/stop pair per window on stderr."""
    script = (
        "import torch\n"
        "from fastvit.stage import Stage\n"
        "from fastvit.train.profile import BusyWindow\n"
        "w = BusyWindow(steps=2, skip=0, cuda=False)\n"
        "x = torch.randn(64, 64)\n"
        "for res in (32, 64, 128):\n"
        "    w.new_stage(Stage(res, 8))\n"
        "    for _ in range(3):\n"
        "        x = torch.tanh(x @ x); w.step_done()\n"
        "w.close()\n"
        "print(len(w.records))\n")
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["3"]
    noisy = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "USDT" in ln or "profiler_st" in ln
             or ln.startswith("STAGE:")]
    assert noisy == []
