"""Broken Neural Scaling Laws (Caballero et al., ICLR 2023, arXiv 2210.14891): fit and extrapolate.

Form with one break:   y = a + b·x^(−c0)·(1 + (x/d1)^(1/f1))^(−c1·f1)
   a the limit, b the scale, c0 the first log-log slope, c1 the slope change at the break d1, f1 its
   sharpness. With zero breaks it is y = a + b·x^(−c0) (a power law plus a limit).

Fit, as in the paper's released code: a brute-force grid (b and d1 on the grid 1.25^k − 1 + 1e-8)
minimising the mean squared error of log(y + 1), then Levenberg-Marquardt (scipy.optimize.curve_fit)
on log(y + 1) from the best grid point. Extrapolation is judged by RMSLE with log y.

Our x (images seen: 1e4–1e8; seconds: 1e1–1e5) is divided by the smallest fitted x before fitting,
so the released code's grid range (k up to 40: d1 up to ~7.5e3 times the smallest x) suits it; the
returned parameters are in the caller's units (d1 and b rescaled back).

Pure numpy/scipy: no torch, nothing of the trainer.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

PARAMS = {0: ("a", "b", "c0"), 1: ("a", "b", "c0", "c1", "d1", "f1")}
# grid (the released code's ranges; b finer at small values, our errors are below 1; f1 > 0)
A_GRID = np.arange(0.0, 1.0, 0.1)
K_B = np.arange(0.0, 20.0, 0.5)          # b = 1.25^k − 1 + 1e-8: 1e-8 … 75
K_D = np.arange(0.0, 40.0, 2.5)          # d1 = 1.25^k − 1 + 1e-8 (in units of the smallest x): … 5.9e3
C_GRID = np.arange(0.0, 1.0, 0.25)
C0_GRID_0 = np.arange(0.0, 2.0, 0.05)    # zero breaks: the slope is the only shape parameter
F_GRID = np.arange(0.25, 1.0001, 0.25)


class BNSLError(ValueError):
    """A fit or forecast that cannot be made (too few points, a refusal): one line for the user."""


def _exp_grid(k):
    return 1.25 ** np.asarray(k, dtype=float) - 1 + 1e-8


def bnsl(x, a, b, c0, c1=0.0, d1=1.0, f1=1.0):
    """The one-break form (c1 = 0: zero breaks). x > 0."""
    x = np.asarray(x, dtype=float)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return a + b * x ** (-c0) * (1.0 + (x / d1) ** (1.0 / f1)) ** (-c1 * f1)


@dataclass
class Fit:
    breaks: int
    params: dict            # in the caller's units of x
    x_min: float            # smallest fitted x
    x_max: float            # largest fitted x
    n: int                  # fitted points
    grid_msle: float        # the best grid point's mean squared log(y+1) error
    rmsle: float            # after LM, on the fitted points, with log y

    def predict(self, x):
        p = self.params
        return bnsl(x, p["a"], p["b"], p["c0"], p.get("c1", 0.0), p.get("d1", 1.0), p.get("f1", 1.0))

    @property
    def break_at(self) -> float | None:
        return self.params.get("d1") if self.breaks else None

    def to_dict(self) -> dict:
        return asdict(self)


def rmsle(pred, y) -> float:
    """Root mean squared error of log y (the paper's extrapolation score)."""
    pred, y = np.asarray(pred, float), np.asarray(y, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.sqrt(np.mean((np.log(pred) - np.log(y)) ** 2)))


def _grid_search(xs, y, breaks: int):
    """Best grid point of mean((log(ŷ+1) − log(y+1))²), vectorised over the whole grid in chunks."""
    ly = np.log(y + 1.0)
    if breaks == 0:
        axes = (A_GRID, _exp_grid(K_B), C0_GRID_0)
    else:
        axes = (A_GRID, _exp_grid(K_B), C_GRID, C_GRID, _exp_grid(K_D), F_GRID)
    mesh = np.stack([m.ravel() for m in np.meshgrid(*axes, indexing="ij")], axis=1)   # (G, P)
    best, best_p = math.inf, None
    for chunk in np.array_split(mesh, max(1, len(mesh) // 20000)):
        cols = [chunk[:, i:i + 1] for i in range(chunk.shape[1])]
        pred = bnsl(xs[None, :], *cols)
        with np.errstate(invalid="ignore", divide="ignore"):
            err = np.mean((np.log(pred + 1.0) - ly[None, :]) ** 2, axis=1)
        err = np.where(np.isfinite(err), err, np.inf)
        i = int(np.argmin(err))
        if err[i] < best:
            best, best_p = float(err[i]), chunk[i]
    if best_p is None:
        raise BNSLError("BNSL grid search found no finite point")
    return best_p, best


def distinct_budgets(x) -> int:
    """Distinct budgets among x, counting values within 10% of each other as one: on the images axis every
    seed's run has its own x, but two seeds of one budget are not two budgets a break can be fitted to."""
    xs = np.sort(np.asarray(x, dtype=float))
    return int(1 + np.sum(xs[1:] > 1.1 * xs[:-1])) if len(xs) else 0


def fit_bnsl(x, y, *, breaks: int | str = "auto") -> Fit:
    """Grid + Levenberg-Marquardt fit of y against x (x > 0, y > 0; repeated x, e.g. seeds, allowed).

    breaks "auto": one break when there are at least 7 distinct x (its 6 parameters and one degree of
    freedom), else zero breaks (3 parameters; needs 3 distinct x)."""
    import scipy.optimize

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise BNSLError("x and y must be 1-d and of the same length")
    if np.any(x <= 0) or np.any(y <= 0) or not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)):
        raise BNSLError("BNSL needs x > 0 and y > 0")
    distinct = distinct_budgets(x)
    if breaks == "auto":
        breaks = 1 if distinct >= len(PARAMS[1]) + 1 else 0
    if breaks not in PARAMS:
        raise BNSLError(f"breaks must be 0, 1 or auto, got {breaks!r}")
    need = len(PARAMS[breaks])
    if distinct < need:
        raise BNSLError(f"a BNSL with {breaks} break(s) has {need} parameters: needs at least {need} distinct "
                        f"budgets, got {distinct}")
    scale = float(x.min())
    xs = x / scale
    p0, grid_err = _grid_search(xs, y, breaks)

    def f_log(_x, *p):
        return np.log(bnsl(_x, *p) + 1.0)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.optimize.OptimizeWarning)   # no covariance: not used
            popt, _ = scipy.optimize.curve_fit(f_log, xs, np.log(y + 1.0), p0=list(p0), maxfev=20000)
        if not np.all(np.isfinite(f_log(xs, *popt))):
            raise RuntimeError("non-finite fit")
    except (RuntimeError, ValueError, TypeError):   # LM did not converge / m < n: the grid point stands
        popt = np.asarray(p0, dtype=float)
    p = dict(zip(PARAMS[breaks], (float(v) for v in popt)))
    # back to the caller's units: b·(x/s)^(−c0) = (b·s^c0)·x^(−c0); d1 scales with x
    p["b"] = p["b"] * scale ** p["c0"]
    if breaks:
        p["d1"] = p["d1"] * scale
    fit = Fit(breaks=breaks, params=p, x_min=scale, x_max=float(x.max()), n=len(x), grid_msle=grid_err, rmsle=0.0)
    fit.rmsle = rmsle(fit.predict(x), y)
    return fit


# ------------------------------------------------------------------------------------------------------
# forecasts

DEFAULT_MAX_FACTOR = 100.0


def check_extrapolation(fit: Fit, x_target: float, max_factor: float = DEFAULT_MAX_FACTOR) -> None:
    """Refuse (BNSLError, one line) a forecast more than max_factor beyond the largest fitted x, or from a
    fit whose break lies beyond the data (a break that has not started cannot be predicted)."""
    if x_target > max_factor * fit.x_max:
        raise BNSLError(f"refusing to extrapolate {x_target / fit.x_max:.0f}x beyond the largest fitted budget "
                        f"(the limit is {max_factor:g}x)")
    if fit.params["a"] < 0:
        raise BNSLError(f"refusing to extrapolate: the fitted limit a={fit.params['a']:.3g} is below zero (an error "
                        "cannot be), so the points do not pin down where the curve levels off")
    if fit.breaks and fit.params["d1"] > fit.x_max:
        raise BNSLError(f"refusing to extrapolate: the fitted break d1={fit.params['d1']:.3g} lies beyond the "
                        f"largest fitted budget {fit.x_max:.3g}, so where it bends cannot be known from the data")


def forecast(x, y, x_target: float, *, breaks="auto", max_factor: float = DEFAULT_MAX_FACTOR,
             groups=None, n_boot: int = 0, seed: int = 0) -> dict:
    """Fit, refuse or forecast y at x_target, with an interval: leave-one-out over distinct x (each refit
    that still has enough points) and, when `groups` (seed per point) gives several points per x, a
    bootstrap that draws one point per x. The interval is the min-max of the full fit and the refits."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    fit = fit_bnsl(x, y, breaks=breaks)
    check_extrapolation(fit, x_target, max_factor)
    point = float(fit.predict(x_target))
    if not np.isfinite(point) or point < 0:
        raise BNSLError(f"refusing to forecast: the fit gives {point:.3g} at the target (not a possible error)")
    others = []
    for xv in np.unique(x):                       # leave one budget out
        keep = x != xv
        try:
            others.append(float(fit_bnsl(x[keep], y[keep], breaks=fit.breaks).predict(x_target)))
        except BNSLError:
            pass
    loo = len(others)
    if n_boot and groups is not None and len(x) > len(np.unique(x)):
        rng = np.random.default_rng(seed)
        ux = np.unique(x)
        for _ in range(n_boot):
            idx = [rng.choice(np.flatnonzero(x == xv)) for xv in ux]
            try:
                others.append(float(fit_bnsl(x[idx], y[idx], breaks=fit.breaks).predict(x_target)))
            except BNSLError:
                pass
    vals = [v for v in [point, *others] if np.isfinite(v) and v >= 0]   # a refit predicting a negative
    # error (top-1 > 100%) says nothing about where the curve ends: not part of the interval
    return {"fit": fit.to_dict(), "x_target": float(x_target), "y": point,
            "lo": min(vals) if len(vals) > 1 else None, "hi": max(vals) if len(vals) > 1 else None,
            "loo_fits": loo, "boot_fits": len(others) - loo}


def holdout_error(x, y, *, breaks="auto") -> dict:
    """Fit without the largest x, predict it: RMSLE (log y) on the held-out points and the mean prediction."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    top = x.max()
    fit = fit_bnsl(x[x < top], y[x < top], breaks=breaks)
    pred = fit.predict(x[x == top])
    return {"x": float(top), "pred": float(np.mean(pred)), "measured": float(np.mean(y[x == top])),
            "rmsle": rmsle(pred, y[x == top]), "fit": fit.to_dict(), "factor": float(top / fit.x_max)}


def grid_points(breaks: int) -> int:
    """How many points the grid search evaluates (documentation and tests)."""
    axes = (A_GRID, K_B, C0_GRID_0) if breaks == 0 else (A_GRID, K_B, C_GRID, C_GRID, K_D, F_GRID)
    return int(np.prod([len(a) for a in axes]))


__all__ = ["BNSLError", "DEFAULT_MAX_FACTOR", "Fit", "bnsl", "check_extrapolation", "fit_bnsl", "forecast",
           "grid_points", "holdout_error", "rmsle"]
