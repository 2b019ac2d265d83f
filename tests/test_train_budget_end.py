"""A time-budgeted run ends on its budget whatever the speed does on the way.

Fake clock (the planner and DriftMonitor as the loop drives them, `_simulate` of
test_train_schedules): dips, bursts, a dip in the last minute, a long slowdown, noise, swings; each
must end within 2.5% of a 6-minute budget. Bug 8: a momentary 0.19× dip measured over the fresh
span after a re-plan was extrapolated to the rest of the run, and the run ended 13% early.
"""
from __future__ import annotations

import pytest

from test_train_schedules import _simulate

BUDGET = 360.0


def _dip(a: float, b: float, factor: float = 0.19):
    return lambda t, g, r: factor if a <= t < b else 1.0


CASES = {                                       # name: (speed factor(t, step, rnd), most re-plans)
    "dip_after_replan": (_dip(290, 304), 4),    # bug 8: the dip fills a fresh span after a re-plan
    "dip_at_263": (_dip(263, 268), 4),          # the run: a short deep dip at 263 s
    "dip_early": (_dip(40, 50), 4),
    "burst": (_dip(120, 150, 1.6), 4),          # faster for a while, then back
    "burst_late": (_dip(300, 320, 1.6), 4),
    "dip_last_minute": (_dip(320, 330), 4),
    "dip_last_seconds": (_dip(340, 348), 4),
    "long_slowdown": (_dip(100, 250, 0.5), 6),
    "slow_then_fast": (lambda t, g, r: 0.7 if t < 120 else 1.3, 6),
    "noisy": (lambda t, g, r: r.uniform(0.5, 1.5), 6),
    "swings": (lambda t, g, r: 1.0 if (t // 20) % 2 == 0 else 0.6, 16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_run_ends_on_the_budget_whatever_the_speed_does(case):
    factor, most = CASES[case]
    end, plan, mon = _simulate(factor, budget=BUDGET)
    assert end == pytest.approx(BUDGET, abs=0.025 * BUDGET), (case, end, plan.replans)
    assert len(plan.replans) <= most, (case, len(plan.replans), plan.replans)
    assert plan.stages[-1].keep == 1.0 and plan.stages[-1].f1 == 1.0


@pytest.mark.parametrize("budget", [120.0, 360.0])
def test_any_dip_or_burst_anywhere_ends_on_the_budget(budget):
    """A sweep: a dip (0.1×, 0.19×, 0.5×) or burst (1.6×, 3×) of 2-20% of the budget starting
    anywhere in the run. The planner before the fix ended a 6-minute run at 175 s (0.1× from 63 s
    for 72 s)."""
    worst = []
    for start in [budget * k / 20 for k in range(1, 20)]:
        for length in (0.02, 0.08, 0.2):
            for depth in (0.1, 0.19, 0.5, 1.6, 3.0):
                end, plan, mon = _simulate(_dip(start, start + length * budget, depth), budget=budget)
                worst.append((abs(end - budget) / budget, len(plan.replans), start, length, depth, end))
    assert max(worst)[0] < 0.025, max(worst)
    assert max(w[1] for w in worst) <= 6, max(worst, key=lambda w: w[1])


# ---------------------------------------------------------------- a real run (bug 7)

def test_real_run_ends_within_a_few_percent_of_its_budget(tiny_prepped, tmp_path, monkeypatch):
    """The CLI on the tiny dataset with a 15 s budget, on a shared 2-core CPU: counted seconds within
    5% of the budget, or within one step if a step takes longer (a step cannot be cut short)."""
    import json
    import statistics

    from fastvit.train.cli import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)     # the reference embedding (see test_train_run)
    run = tmp_path / "run"
    assert main(["--data", str(tiny_prepped), "--out", str(run), "--minutes", "0.25", "--evals", "0",
                 "--preset", "test", "--device", "cpu", "--backend", "dali", "--no-progress"]) == 0
    res = json.loads((run / "results.json").read_text())
    steps = [r["interval_s"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    tol = max(0.05 * 15, statistics.median(steps))
    assert abs(res["counted_s"] - 15.0) <= tol, (res["counted_s"], tol, res["replans"])
