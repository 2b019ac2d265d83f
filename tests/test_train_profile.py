"""The profiler's busy share (fastvit.train.profile): interval union, and a window per stage on CPU."""
from __future__ import annotations

import pytest
import torch

from fastvit.stage import Stage
from fastvit.train.profile import BusyWindow, union_seconds


def test_union_counts_overlaps_once():
    assert union_seconds([]) == 0
    assert union_seconds([(0, 2), (1, 3), (5, 6)]) == 4          # [0,3) + [5,6)
    assert union_seconds([(5, 6), (0, 10)]) == 10                 # nested, unsorted


def test_window_per_stage_measures_op_time_over_wall():
    win = BusyWindow(steps=3, skip=1, cuda=False)
    x = torch.randn(128, 128)
    recs = []
    for stage in (Stage(32, 8), Stage(64, 4)):
        recs.append(win.new_stage(stage))
        for _ in range(6):
            for _ in range(5):
                x = torch.tanh(x @ x)
            recs.append(win.step_done())
    recs.append(win.close())
    got = [r for r in recs if r]
    assert [(r["res"], r["profiled_steps"]) for r in got] == [(32, 3), (64, 3)]
    for r in got:
        assert r["kind"] == "profile" and r["what"] == "cpu_ops"
        assert 0 < r["busy_s"] <= r["wall_s"] * 1.05 and r["busy"] == pytest.approx(r["busy_s"] / r["wall_s"], rel=1e-2)


def test_a_stage_that_ends_early_closes_its_window_at_the_switch():
    win = BusyWindow(steps=100, skip=1, cuda=False)
    win.new_stage(Stage(32, 8))
    for _ in range(4):
        assert win.step_done() is None
    rec = win.new_stage(Stage(64, 8))
    assert rec["res"] == 32 and rec["profiled_steps"] == 3


def test_off_by_default():
    win = BusyWindow(steps=0, skip=0, cuda=False)
    assert win.new_stage(Stage(32, 8)) is None and win.step_done() is None and win.close() is None
