"""Forecasts that training reads without depending on the sweep: BNSL fits (`bnsl`) and a sweep's
expected top-1 at a budget (`expected_top1`, for fastvit-train --expect-from). fastvit.sweep writes the
files and fits; fastvit.train reaches them only through this package, so neither imports the other's
way back (train -> forecast <- sweep)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import bnsl
from .bnsl import BNSLError
from .sweep_csv import read_csv

__all__ = ["BNSLError", "bnsl", "expected_top1"]


def expected_top1(sweep_dir: Path, variant: str, budget_s: float) -> tuple[float, str]:
    """The sweep's BNSL fit (seconds axis) of `variant`, evaluated at budget_s: (top-1 %, a one-line note)."""
    rows = [r for r in read_csv(Path(sweep_dir) / "sweep.csv") if r["variant"] == variant and r.get("budget_s")]
    if not rows:
        raise bnsl.BNSLError(f"no runs of variant {variant!r} with a wall-clock budget in {sweep_dir}/sweep.csv")
    x = np.array([r["budget_s"] for r in rows])
    fit = bnsl.fit_bnsl(x, np.array([1 - r["top1"] / 100 for r in rows]))
    bnsl.check_extrapolation(fit, budget_s)
    return 100 * (1 - float(fit.predict(budget_s))), f"BNSL ({fit.breaks} break(s)) on {fit.n} runs of {variant}"
