"""BNSL (fastvit.sweep.bnsl): known parameters recovered from noiseless points, extrapolation within a
stated error, and the refusals (too far beyond the data, a break beyond the data, too few budgets)."""
from __future__ import annotations

import numpy as np
import pytest

from fastvit.forecast import bnsl

X = 1e4 * 2.0 ** np.arange(10)            # images seen, 1e4 … 5.1e6


def test_one_break_recovers_known_parameters_and_extrapolates():
    true = dict(a=0.1, b=0.9, c0=0.1, c1=0.4, d1=5e4, f1=0.5)     # the break inside the fitted range
    y = bnsl.bnsl(X, **true)
    fit = bnsl.fit_bnsl(X[:8], y[:8], breaks="auto")               # 8 distinct budgets: one break
    assert fit.breaks == 1
    for k, v in true.items():
        assert fit.params[k] == pytest.approx(v, rel=1e-3), k
    assert fit.rmsle < 1e-6
    assert bnsl.rmsle(fit.predict(X[8:]), y[8:]) < 1e-3            # 2 and 4x beyond the largest fitted x
    bnsl.check_extrapolation(fit, X[-1])                            # within the factor, break inside: allowed


def test_zero_breaks_recover_a_power_law_with_a_limit():
    true = dict(a=0.2, b=3.0, c0=0.3)
    y = bnsl.bnsl(X, **true)
    fit = bnsl.fit_bnsl(X[:4], y[:4])                               # 4 budgets: auto picks zero breaks
    assert fit.breaks == 0
    for k, v in true.items():
        assert fit.params[k] == pytest.approx(v, rel=1e-3), k
    assert bnsl.rmsle(fit.predict(X[4:]), y[4:]) < 1e-3            # up to 64x beyond


def test_forecast_interval_and_holdout():
    true = dict(a=0.2, b=3.0, c0=0.3)
    rng = np.random.default_rng(0)
    x = np.repeat(X[:5], 2)                                         # two seeds per budget
    y = bnsl.bnsl(x, **true) * (1 + 0.01 * rng.standard_normal(len(x)))
    f = bnsl.forecast(x, y, X[7], groups=np.tile([0, 1], 5), n_boot=10)
    assert f["loo_fits"] == 5 and f["boot_fits"] == 10
    assert f["lo"] <= f["y"] <= f["hi"]
    assert f["lo"] <= bnsl.bnsl(X[7], **true) <= f["hi"]
    h = bnsl.holdout_error(X[:5], bnsl.bnsl(X[:5], **true))
    assert h["x"] == X[4] and h["rmsle"] < 1e-3


def test_refuses_far_extrapolation():
    y = bnsl.bnsl(X[:4], a=0.2, b=3.0, c0=0.3)
    with pytest.raises(bnsl.BNSLError, match="refusing to extrapolate 101x"):
        bnsl.forecast(X[:4], y, 101 * X[3], max_factor=100)
    bnsl.forecast(X[:4], y, 99 * X[3], max_factor=100)              # just inside: a forecast


def test_refuses_a_break_beyond_the_data():
    true = dict(a=0.1, b=0.9, c0=0.1, c1=0.4, d1=5e4, f1=0.5)
    fit = bnsl.fit_bnsl(X[:8], bnsl.bnsl(X[:8], **true), breaks=1)
    fit.params["d1"] = 2 * fit.x_max                                # the same fit, its break moved past the data
    with pytest.raises(bnsl.BNSLError, match="break .* lies beyond"):
        bnsl.check_extrapolation(fit, 2 * fit.x_max)


def test_too_few_budgets_or_bad_values():
    with pytest.raises(bnsl.BNSLError, match="at least 3 distinct"):
        bnsl.fit_bnsl([1e4, 1e4, 2e4], [0.5, 0.5, 0.4])
    with pytest.raises(bnsl.BNSLError, match="at least 6 distinct"):
        bnsl.fit_bnsl(X[:5], bnsl.bnsl(X[:5], 0.2, 3.0, 0.3), breaks=1)
    with pytest.raises(bnsl.BNSLError, match="y > 0"):
        bnsl.fit_bnsl(X[:4], [0.5, 0.4, 0.0, 0.3])


def test_seeds_of_one_budget_are_one_budget_and_an_impossible_limit_is_refused():
    """Images axis: each seed's run has its own x; 4 budgets × 2 seeds are 4 budgets (zero breaks), not 8.
    A fit whose limit a is below zero (error < 0 ahead) is refused, not forecast as top-1 > 100%."""
    x = np.array([3968, 4192, 8384, 8672, 17088, 17536, 35392, 35872], float)
    assert bnsl.distinct_budgets(x) == 4 and bnsl.distinct_budgets([1, 2, 4, 8, 16, 32, 64]) == 7
    assert bnsl.fit_bnsl(x, bnsl.bnsl(x, 0.2, 5.0, 0.3)).breaks == 0
    xs = np.array([120, 240, 480, 960], float)
    y = np.array([0.66, 0.60, 0.52, 0.42])         # still falling faster in log-log: the limit fits below 0
    fit = bnsl.fit_bnsl(xs, y)
    assert fit.params["a"] < 0
    with pytest.raises(bnsl.BNSLError, match="limit a=.* is below zero"):
        bnsl.forecast(xs, y, 86400.0)
