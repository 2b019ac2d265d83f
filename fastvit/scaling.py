"""The joint scaling law of top-1 error in model size and images seen, and the choice it makes.

    err(N, D) = E + A / N^alpha + B / D^beta          err = 1 - top1/100, N = parameters, D = training images seen

Chinchilla's approach 3 (Hoffmann et al. 2022, arXiv 2203.15556) with top-1 error in place of the LM loss, as
SoViT (Alabdulmohsin et al. 2023, arXiv 2305.13035) fits image-classification error: E is the error no size or
data removes, A/N^alpha what a bigger model removes, B/D^beta what more images remove.

Fit (`fit_law`): Chinchilla's objective, the Huber loss (delta 1e-3) of log(predicted error) − log(error),
minimised by L-BFGS from a grid of starts. The starts come from the partially linear structure of the law:
for fixed (alpha, beta) the error is linear in (E, A, B), so a dense (alpha, beta) grid with non-negative
least squares for (E, A, B) at each point ranks the starts, and L-BFGS refines the best few in all five
(log E, log A, alpha, log B, beta). Any parameter can be held fixed (`fixed={"alpha": 0.3}`), e.g. when the
points hold too few model sizes to determine alpha. Points that cannot determine the free parameters are
refused (ScalingError, one line).

Each fit also refits without each budget's points (leave-one-budget-out): their error on the held-out
points is the law's forecast error, and the spread of the refits' predictions is `interval(n, d)`.

Growth (`--growth manual`: the depth grows with the curriculum, MoGrow) is one more term, fitted after the law on
runs that grew (`fit_growth`): a growing run of final depth L and size N that saw D_k images at a shallower depth
k (and the rest at L) is forecast as a fixed model of size N that saw

    D_eff = D_L + sum over k < L of credit(k, L) * D_k,     credit(k, L) = 1 - c * (1/k - 1/L), clipped to [0, 1]

one parameter c >= 0: c = 0, growth is free speed (a shallow image is a full one); c = 1, an image seen at depth 1
of 2 counts 0.5, at 2 of 4 0.75, at 6 of 12 0.92: a shallow phase is worth more the deeper it is (on Imagenette
the credits the grid's law gives each growing run were 0.43-0.70 for 1 -> 2 and 0.69-0.95 for 2 -> 4:
bench/results/auto/README.md). A law without growth runs has no growth term: it
forecasts no growing run (`choose` gives such a candidate top1 None, never the pick).

scaling.json (`save_law` / `load_law`, the one reader and writer of the format) holds the law, the points it
was fitted on, the refits, the data and resolution it was fitted on, and its provenance. Pure: numpy and
scipy only, nothing of the trainer or the sweep (both import this module).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "fastvit-scaling"
VERSION = 1
PARAMS = ("E", "A", "alpha", "B", "beta")
FORM = "err = E + A/N^alpha + B/D^beta; err = 1 - top1/100; N = trainable parameters; D = training images seen"
HUBER_DELTA = 1e-3                                   # Chinchilla's
EXP_GRID = np.round(np.arange(0.02, 1.5001, 0.02), 4)   # alpha, beta grid of the linear pre-fit
REFINE_STARTS = 6                                    # best grid points L-BFGS starts from
EXP_BOUNDS = (0.0, 3.0)
GROWTH_FORM = ("a run that grows its depth to L: N = its final parameters, D = images at depth L + sum over k < L of "
               "(1 - c*(1/k - 1/L)) x images at depth k, each credit clipped to [0, 1]")
C_BOUNDS = (0.0, 2.0)
INTERVAL_METHOD = ("min-max of the full fit and its leave-one-budget-out refits; where no refit could be made, "
                   "the prediction ± the fit's RMSE on its own points")


class ScalingError(ValueError):
    """A law that cannot be fitted, read or used: one line for the user."""


# ------------------------------------------------------------------------------------------------------
# the law

def law_error(params: dict, n, d):
    """err(N, D) for arrays (broadcast) or scalars."""
    n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
    return params["E"] + params["A"] * n ** (-params["alpha"]) + params["B"] * d ** (-params["beta"])


def _top1(params: dict, n, d):
    return 100.0 * (1.0 - law_error(params, n, d))


@dataclass(frozen=True)
class ScalingLaw:
    params: dict                    # E, A, alpha, B, beta
    points: tuple                   # the fitted points: {shape, params, images, top1, budget, seed, source}
    loo: dict                       # leave-one-budget-out: {"rmse", "max_abs", "by_budget": [...], "refits": [...]}
    provenance: str                 # where the points come from, in words
    data: dict                      # {"name", "classes", "resolution"} the points were measured on
    n_range: tuple                  # (smallest, largest) fitted N
    d_range: tuple                  # (smallest, largest) fitted D
    fixed: tuple = ()               # the parameters held fixed in the fit
    fit_info: dict = field(default_factory=dict)    # loss, delta, the fit's own RMSE in top-1 points
    growth: dict = field(default_factory=dict)      # the growth term (fit_growth); {}: none, growth not forecast

    def predict(self, n, d) -> float:
        """Predicted top-1 (%) of a model of n parameters trained on d images."""
        return float(_top1(self.params, n, d))

    def interval(self, n, d) -> tuple[float, float]:
        """(lo, hi) top-1 (%): min-max over the full fit and its leave-one-budget-out refits (the refits that
        could be made); where there were none, the prediction ± the fit's RMSE on its own points."""
        p = self.predict(n, d)
        if not self.loo.get("refits"):
            r = float(self.fit_info.get("rmse_top1") or 0.0)
            return (p - r, p + r)
        vals = [p] + [float(_top1(r, n, d)) for r in self.loo["refits"]]
        vals = [v for v in vals if math.isfinite(v)]
        return (min(vals), max(vals))

    def effective_images(self, images, images_shallow, depth, c: float | None = None) -> float:
        """D of a growing run of final depth `depth` that saw `images` in all, `images_shallow` {k: images} of
        them at depths k < depth (a fixed model: {}, D = images). `c`: the growth term's unless given. A
        ScalingError when it grew and the law has no growth term."""
        shallow = {int(k): float(v) for k, v in (images_shallow or {}).items() if float(v) > 0}
        if not shallow:
            return float(images)
        if c is None:
            if not self.growth:
                raise ScalingError("the law has no growth term: fit one on runs that grew (fastvit-sweep "
                                   "--fit-scaling over --growth manual runs)")
            c = self.growth["c"]
        return grown_images(images, shallow, int(depth), c)

    def grown_interval(self, n, images, images_shallow, depth) -> tuple[float, float]:
        """interval() of a growing run over c and its leave-one-budget-out refits (min-max)."""
        lo, hi = math.inf, -math.inf
        for c in [self.growth["c"], *self.growth.get("loo", {}).get("cs", [])]:
            a, b = self.interval(n, self.effective_images(images, images_shallow, depth, c))
            lo, hi = min(lo, a), max(hi, b)
        return (lo, hi)

    def extrapolates(self, n, d) -> bool | str:
        """False inside the fitted N and D ranges; else one phrase saying which and how far."""
        out = []
        for what, v, (lo, hi) in (("N", n, self.n_range), ("D", d, self.d_range)):
            if v > hi * (1 + 1e-9):
                out.append(f"{what} {v:.3g} is {v / hi:.1f}x the largest fitted ({hi:.3g})")
            elif v < lo * (1 - 1e-9):
                out.append(f"{what} {v:.3g} is {lo / v:.1f}x below the smallest fitted ({lo:.3g})")
        return "; ".join(out) if out else False

    def mismatch(self, classes: int | None, resolution: int | None) -> str | None:
        """One warning line when the run's data (class count) or resolution differs from the law's; None
        when they agree (or the law does not say)."""
        diffs = []
        if classes is not None and self.data.get("classes") not in (None, classes):
            diffs.append(f"{self.data['classes']} classes (this run: {classes})")
        if resolution is not None and self.data.get("resolution") not in (None, resolution):
            diffs.append(f"{self.data['resolution']} px (this run: {resolution})")
        if not diffs:
            return None
        name = self.data.get("name") or "other data"
        return (f"warning: the scaling law was fitted on {name} at {' and '.join(diffs)}: its forecasts are "
                "a guide to the ranking here, not a prediction of this run's top-1")

    def describe(self) -> str:
        p = self.params
        return (f"err = {p['E']:.4g} + {p['A']:.4g}/N^{p['alpha']:.3g} + {p['B']:.4g}/D^{p['beta']:.3g}"
                + (f" ({', '.join(self.fixed)} fixed)" if self.fixed else ""))


# ------------------------------------------------------------------------------------------------------
# fitting

def _huber(r, delta=HUBER_DELTA):
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _clean(points) -> list[dict]:
    out = []
    for i, p in enumerate(points):
        try:
            n, d, t = float(p["params"]), float(p["images"]), float(p["top1"])
        except (KeyError, TypeError, ValueError):
            raise ScalingError(f"point {i}: needs numbers params, images and top1, got {p!r}") from None
        if not (n > 0 and d > 0 and 0 < t < 100 and all(map(math.isfinite, (n, d, t)))):
            raise ScalingError(f"point {i}: params and images must be > 0 and top1 in (0, 100), got "
                               f"params={n:g}, images={d:g}, top1={t:g}")
        out.append({**p, "params": int(round(n)), "images": int(round(d)), "top1": t})
    return out


def _distinct(values, rel=0.02) -> int:
    xs = np.sort(np.asarray(values, dtype=float))
    return int(1 + np.sum(xs[1:] > (1 + rel) * xs[:-1])) if len(xs) else 0


def _check_determined(pts: list[dict], fixed: dict) -> None:
    free = [k for k in PARAMS if k not in fixed]
    if len(pts) < len(free) + 1:
        raise ScalingError(f"the law has {len(free)} free parameters ({', '.join(free)}): it needs at least "
                           f"{len(free) + 1} points, got {len(pts)}")
    n_distinct = _distinct([p["params"] for p in pts])
    d_distinct = _distinct([p["images"] for p in pts])
    if n_distinct < 2 and not {"A", "alpha"} <= set(fixed):
        raise ScalingError(f"all {len(pts)} points have one model size (N ≈ {pts[0]['params']:,}): they cannot "
                           "determine A and alpha; fit more shapes or fix both (fixed={'A': ..., 'alpha': ...})")
    if d_distinct < 2 and not {"B", "beta"} <= set(fixed):
        raise ScalingError(f"all {len(pts)} points saw about one number of images (D ≈ {pts[0]['images']:,}): "
                           "they cannot determine B and beta; add budgets or fix both")
    if n_distinct < 3 and "alpha" not in fixed and "A" not in fixed:
        raise ScalingError(f"{n_distinct} distinct model sizes cannot determine alpha beside A (a power law needs "
                           "three sizes to show its curvature): fit more shapes or fix alpha")
    if d_distinct < 3 and "beta" not in fixed and "B" not in fixed:
        raise ScalingError(f"{d_distinct} distinct image counts cannot determine beta beside B: add budgets or fix beta")


def _objective(theta, names, fixed, logn, logd, logy):
    p = dict(fixed)
    for k, v in zip(names, theta):
        p[k] = v
    # log-sum-exp form of Chinchilla: log(E + A N^-a + B D^-b), with E, A, B as logs
    terms = np.stack([np.full_like(logn, p["logE"]), p["logA"] - p["alpha"] * logn, p["logB"] - p["beta"] * logd])
    m = terms.max(axis=0)
    pred = m + np.log(np.exp(terms - m).sum(axis=0))
    return float(_huber(pred - logy).sum())


def _linear_starts(n, d, y, fixed: dict) -> list[dict]:
    """For each (alpha, beta) on the grid (or fixed), non-negative least squares of y on [1, N^-a, D^-b] (E, A,
    B fixed ones moved to the left side); the grid points ranked by the Huber-log objective."""
    from scipy.optimize import nnls

    alphas = [fixed["alpha"]] if "alpha" in fixed else EXP_GRID
    betas = [fixed["beta"]] if "beta" in fixed else EXP_GRID
    cands = []
    logy = np.log(y)
    for a in alphas:
        xa = n ** (-a)
        for b in betas:
            xb = d ** (-b)
            cols, names, rhs = [], [], y.copy()
            for name, col in (("E", np.ones_like(y)), ("A", xa), ("B", xb)):
                if name in fixed:
                    rhs = rhs - fixed[name] * col
                else:
                    cols.append(col)
                    names.append(name)
            if cols:
                scale = np.array([c.max() for c in cols])
                coef, _ = nnls(np.stack(cols, axis=1) / scale, rhs)
                coef = coef / scale
            else:
                coef = []
            p = {"alpha": a, "beta": b, **{k: fixed[k] for k in ("E", "A", "B") if k in fixed}}
            p.update(zip(names, coef))
            pred = law_error(p, n, d)
            if np.all(pred > 0):
                cands.append((float(_huber(np.log(pred) - logy).sum()), p))
    cands.sort(key=lambda c: c[0])
    return [c[1] for c in cands[:REFINE_STARTS]]


def _fit_params(pts: list[dict], fixed: dict) -> tuple[dict, float]:
    from scipy.optimize import minimize

    n = np.array([p["params"] for p in pts], dtype=float)
    d = np.array([p["images"] for p in pts], dtype=float)
    y = np.array([1.0 - p["top1"] / 100.0 for p in pts])
    logn, logd, logy = np.log(n), np.log(d), np.log(y)
    tiny = 1e-12
    fixed_t = {("log" + k if k in ("E", "A", "B") else k): (math.log(max(v, tiny)) if k in ("E", "A", "B") else v)
               for k, v in fixed.items()}
    names = [k for k in ("logE", "logA", "alpha", "logB", "beta") if k not in fixed_t]
    bounds = [EXP_BOUNDS if k in ("alpha", "beta") else (-40.0, 40.0) for k in names]
    best, best_val = None, math.inf
    for s in _linear_starts(n, d, y, fixed):
        x0 = [math.log(max(s[k[3:]], tiny)) if k.startswith("log") else s[k] for k in names]
        r = minimize(_objective, x0, args=(names, fixed_t, logn, logd, logy), method="L-BFGS-B", bounds=bounds,
                     options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000})
        val = float(r.fun)
        if val < best_val and np.all(np.isfinite(r.x)):
            best, best_val = r.x, val
    if best is None:
        raise ScalingError("no start of the fit gave a finite law (the points' error does not fall with N or D)")
    p = dict(fixed_t)
    p.update(zip(names, (float(v) for v in best)))
    out = {"E": math.exp(p["logE"]), "A": math.exp(p["logA"]), "alpha": p["alpha"],
           "B": math.exp(p["logB"]), "beta": p["beta"]}
    return out, best_val


def _budget_key(p: dict):
    """What 'one budget' is for leave-one-budget-out: the point's budget label, else its images."""
    return str(p["budget"]) if p.get("budget") not in (None, "") else f"{p['images']} images"


def _held_for(rest: list[dict], fixed: dict, full: dict) -> tuple | None:
    """The fewest free parameters to hold at the full fit's values so that `rest` determines the others:
    () when it determines them all; None when even one free parameter cannot be fitted."""
    from itertools import combinations

    free = [k for k in PARAMS if k not in fixed]
    for size in range(len(free)):
        for hold in combinations(free, size):
            try:
                _check_determined(rest, {**fixed, **{k: full[k] for k in hold}})
                return hold
            except ScalingError:
                continue
    return None


def _leave_one_budget_out(pts: list[dict], fixed: dict, full: dict) -> dict:
    """Refit without each budget's points and predict them. Where the other budgets cannot determine every free
    parameter, the fewest are held at the full fit's values ("held": a weaker test, said in the result)."""
    groups: dict = {}
    for p in pts:
        groups.setdefault(_budget_key(p), []).append(p)
    by_budget, refits, resid = [], [], []
    if len(groups) < 2:
        return {"by_budget": [], "refits": [], "rmse": None, "max_abs": None,
                "note": "one budget: nothing to leave out"}
    for key, held in groups.items():
        rest = [p for p in pts if _budget_key(p) != key]
        hold = _held_for(rest, fixed, full)
        if hold is None:
            by_budget.append({"budget": key, "n": len(held), "refused": "the other budgets' points cannot "
                              "determine any parameter of the law"})
            continue
        params, _ = _fit_params(rest, {**fixed, **{k: full[k] for k in hold}})
        r = [_top1(params, p["params"], p["images"]) - p["top1"] for p in held]
        resid += r
        refits.append(params)
        by_budget.append({"budget": key, "n": len(held), "rmse": float(np.sqrt(np.mean(np.square(r)))),
                          "mean_error": float(np.mean(r)), "max_abs": float(np.max(np.abs(r))),
                          "held": list(hold)})
    return {"by_budget": by_budget, "refits": refits,
            "rmse": float(np.sqrt(np.mean(np.square(resid)))) if resid else None,
            "max_abs": float(np.max(np.abs(resid))) if resid else None,
            "unit": "top-1 points (predicted − measured) on the held-out budget's points"}


def fit_law(points, *, fixed: dict | None = None, data: dict | None = None, provenance: str = "",
            loo: bool = True) -> ScalingLaw:
    """Fit the law to points [{"params", "images", "top1" (%), "budget"?, "shape"?, "seed"?, "source"?}].

    fixed: parameters held at a value (names of PARAMS). data: {"name", "classes", "resolution"} the points were
    measured on. Raises ScalingError (one line) when the points cannot determine the free parameters."""
    fixed = dict(fixed or {})
    bad = sorted(set(fixed) - set(PARAMS))
    if bad:
        raise ScalingError(f"unknown fixed parameter(s) {', '.join(bad)}; the law's are {', '.join(PARAMS)}")
    pts = _clean(points)
    _check_determined(pts, fixed)
    params, obj = _fit_params(pts, fixed)
    fit_resid = [_top1(params, p["params"], p["images"]) - p["top1"] for p in pts]
    info = {"loss": "huber(log predicted error - log error)", "delta": HUBER_DELTA, "objective": obj,
            "rmse_top1": float(np.sqrt(np.mean(np.square(fit_resid)))), "n_points": len(pts),
            "interval": INTERVAL_METHOD}
    lo = _leave_one_budget_out(pts, fixed, params) if loo else {"by_budget": [], "refits": [], "rmse": None,
                                                         "max_abs": None, "note": "not computed"}
    ns = [p["params"] for p in pts]
    ds = [p["images"] for p in pts]
    return ScalingLaw(params=params, points=tuple(pts), loo=lo, provenance=provenance, data=dict(data or {}),
                      n_range=(min(ns), max(ns)), d_range=(min(ds), max(ds)), fixed=tuple(sorted(fixed)),
                      fit_info=info)


def credit(k: int, depth: int, c: float) -> float:
    """What an image seen at depth k of a run growing to `depth` is worth in images of the final model."""
    return min(1.0, max(0.0, 1.0 - c * (1.0 / k - 1.0 / depth)))


def _clean_growth(points) -> list[dict]:
    pts = _clean(points)
    for i, p in enumerate(pts):
        try:
            depth = int(p["depth"])
            shallow = {int(k): int(round(float(v))) for k, v in dict(p["images_shallow"]).items()}
        except (KeyError, TypeError, ValueError):
            raise ScalingError(f"growth point {i}: needs depth (the final one) and images_shallow {{depth: images}} "
                               f"(images seen at shallower depths), got depth={p.get('depth')!r}, "
                               f"images_shallow={p.get('images_shallow')!r}") from None
        shallow = {k: v for k, v in shallow.items() if v > 0}
        if not shallow or sum(shallow.values()) >= p["images"] or not all(1 <= k < depth for k in shallow):
            raise ScalingError(f"growth point {i}: images_shallow must hold images at depths 1..{depth - 1} summing to "
                               f"less than its {p['images']:,} images, got {shallow} (a run that never trained "
                               "shallow did not grow)")
        p["depth"], p["images_shallow"] = depth, shallow
    return pts


def grown_images(images: float, shallow: dict, depth: int, c: float) -> float:
    """D_eff: `images` with each of `shallow` {k: images seen at depth k < depth} counted at credit(k, depth, c)."""
    return float(images) + sum((credit(k, depth, c) - 1.0) * v for k, v in shallow.items())


def _grown_top1(params: dict, c: float, p: dict) -> float:
    return float(_top1(params, p["params"], grown_images(p["images"], p["images_shallow"], p["depth"], c)))


def _fit_c(params: dict, pts: list[dict]) -> float:
    """c in C_BOUNDS minimising the Huber-log objective of the law (params held) on growing runs."""
    from scipy.optimize import minimize_scalar

    logy = np.log(np.array([1.0 - p["top1"] / 100.0 for p in pts]))

    def obj(c):
        pred = np.array([1.0 - _grown_top1(params, c, p) / 100.0 for p in pts])
        return float(_huber(np.log(pred) - logy).sum())

    grid = np.linspace(*C_BOUNDS, 201)                     # the objective need not be convex in c: a grid first
    c0 = float(grid[int(np.argmin([obj(c) for c in grid]))])
    step = grid[1] - grid[0]
    r = minimize_scalar(obj, bounds=(max(C_BOUNDS[0], c0 - step), min(C_BOUNDS[1], c0 + step)),
                        method="bounded", options={"xatol": 1e-6})
    return float(r.x) if r.fun <= obj(c0) else c0


def fit_growth(law: ScalingLaw, points, *, provenance: str = "") -> ScalingLaw:
    """The law with its growth term: c fitted on growing runs [{"params" (final), "images" (all), "depth" (final),
    "images_shallow" {k: images seen at depth k < depth}, "top1", "budget"?, ...}] with the law's parameters held.
    Leave-one-budget-out as the law's: c refitted without a budget's growing runs, under the law's own refit
    without that budget where it has one, predicts them. Pure: returns a new law."""
    from dataclasses import replace

    pts = _clean_growth(points)
    if not pts:
        raise ScalingError("no growing runs to fit the growth term on")
    c = _fit_c(law.params, pts)
    resid = [_grown_top1(law.params, c, p) - p["top1"] for p in pts]
    refit_of = {b["budget"]: r for b, r in zip([b for b in law.loo.get("by_budget", []) if "refused" not in b],
                                               law.loo.get("refits", []))}
    groups: dict = {}
    for p in pts:
        groups.setdefault(_budget_key(p), []).append(p)
    by_budget, cs, held_resid = [], [], []
    for key, held in groups.items():
        rest = [p for p in pts if _budget_key(p) != key]
        if not rest:
            by_budget.append({"budget": key, "n": len(held), "refused": "no growing run at another budget"})
            continue
        params = refit_of.get(key, law.params)
        ck = _fit_c(params, rest)
        r = [_grown_top1(params, ck, p) - p["top1"] for p in held]
        cs.append(ck)
        held_resid += r
        by_budget.append({"budget": key, "n": len(held), "c": ck, "rmse": float(np.sqrt(np.mean(np.square(r)))),
                          "mean_error": float(np.mean(r)), "max_abs": float(np.max(np.abs(r))),
                          "law": "refit without this budget" if key in refit_of else "full fit"})
    term = {"form": GROWTH_FORM, "c": c, "bounds": list(C_BOUNDS), "provenance": provenance,
            "fit": {"n_points": len(pts), "rmse_top1": float(np.sqrt(np.mean(np.square(resid))))},
            "loo": {"by_budget": by_budget, "cs": cs,
                    "rmse": float(np.sqrt(np.mean(np.square(held_resid)))) if held_resid else None,
                    "unit": "top-1 points (predicted − measured) on the held-out budget's growing runs"},
            "points": [{**p, "images_shallow": {str(k): v for k, v in p["images_shallow"].items()}} for p in pts]}
    return replace(law, growth=term)


# ------------------------------------------------------------------------------------------------------
# the choice

def choose(law: ScalingLaw, candidates) -> list[dict]:
    """candidates [{"shape", "params", "images", "depth"?, "images_shallow"?, ...}] → one row each (the candidate's
    keys plus "top1", "interval" [lo, hi], "extrapolates" False|str and, for a growing candidate (images_shallow
    {k: images seen at depth k < depth}), "images_effective"), best predicted top-1 first, ties toward fewer params.
    A candidate that sees no image in the budget, or grows under a law with no growth term, gets top1 None (with
    the reason in "extrapolates") and goes last. Pure: nothing is changed."""
    rows = []
    for c in candidates:
        n, d = float(c["params"]), float(c["images"])
        grows = any(float(v) > 0 for v in (c.get("images_shallow") or {}).values())
        if d <= 0:
            rows.append({**c, "top1": None, "interval": None, "extrapolates": "sees no training image in the budget"})
            continue
        if grows and not law.growth:
            rows.append({**c, "top1": None, "interval": None, "extrapolates": "grows, and the law has no growth term"})
            continue
        if grows:
            d_eff = law.effective_images(d, c["images_shallow"], c["depth"])
            lo, hi = law.grown_interval(n, d, c["images_shallow"], c["depth"])
            rows.append({**c, "images_effective": int(round(d_eff)), "top1": law.predict(n, d_eff),
                         "interval": [lo, hi], "extrapolates": law.extrapolates(n, d_eff)})
            continue
        lo, hi = law.interval(n, d)
        rows.append({**c, "top1": law.predict(n, d), "interval": [lo, hi], "extrapolates": law.extrapolates(n, d)})
    return [rows[i] for i in best_first([r["top1"] for r in rows], [float(r["params"]) for r in rows])]


def best_first(top1s, params) -> list[int]:
    """Indices by forecast top-1, highest first (None last), ties toward fewer parameters, then input order:
    the one ordering of forecasts (choose, fastvit-search's ranking)."""
    return sorted(range(len(top1s)), key=lambda i: (top1s[i] is None, -(top1s[i] or 0.0), params[i], i))


# ------------------------------------------------------------------------------------------------------
# scaling.json: the one reader and writer

def law_to_dict(law: ScalingLaw) -> dict:
    return {"format": FORMAT, "version": VERSION, "form": FORM, "params": law.params, "fixed": list(law.fixed),
            "data": law.data, "provenance": law.provenance, "n_range": list(law.n_range),
            "d_range": list(law.d_range), "fit": law.fit_info, "leave_one_budget_out": law.loo,
            "points": list(law.points), **({"growth": law.growth} if law.growth else {})}


def save_law(law: ScalingLaw, path) -> Path:
    """Write scaling.json (atomically: a reader never sees half a file)."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(law_to_dict(law), indent=1, default=_json_default) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)                     # mkstemp's 0600 would hide a shipped prior from other users
    os.replace(tmp, path)
    return path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(f"{type(o).__name__} is not JSON")


def _num(d: dict, key: str, where: str) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ScalingError(f"{where}: {key} must be a number, got {v!r}")
    return float(v)


def law_from_dict(d, where: str = "scaling law") -> ScalingLaw:
    """Validate and build; every problem is one ScalingError line naming `where`."""
    if not isinstance(d, dict):
        raise ScalingError(f"{where}: not a JSON object")
    if d.get("format") != FORMAT:
        raise ScalingError(f"{where}: not a scaling law (format {d.get('format')!r}, expected {FORMAT!r})")
    if d.get("version") != VERSION:
        raise ScalingError(f"{where}: version {d.get('version')!r} is not {VERSION}")
    p = d.get("params")
    if not isinstance(p, dict):
        raise ScalingError(f"{where}: params must be an object with {', '.join(PARAMS)}")
    params = {k: _num(p, k, f"{where}: params") for k in PARAMS}
    if params["E"] < 0 or params["A"] < 0 or params["B"] < 0:
        raise ScalingError(f"{where}: params E, A and B must be >= 0")
    ranges = []
    for key in ("n_range", "d_range"):
        r = d.get(key)
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(v, (int, float)) and v > 0 for v in r)
                and r[0] <= r[1]):
            raise ScalingError(f"{where}: {key} must be [smallest, largest], both > 0")
        ranges.append(tuple(float(v) for v in r))
    data = d.get("data") or {}
    if not isinstance(data, dict):
        raise ScalingError(f"{where}: data must be an object {{name, classes, resolution}}")
    for key in ("classes", "resolution"):
        if data.get(key) is not None and (not isinstance(data[key], int) or data[key] < 1):
            raise ScalingError(f"{where}: data.{key} must be a positive integer, got {data[key]!r}")
    loo = d.get("leave_one_budget_out") or {}
    refits = loo.get("refits", []) if isinstance(loo, dict) else None
    if not isinstance(refits, list):
        raise ScalingError(f"{where}: leave_one_budget_out.refits must be a list")
    for i, r in enumerate(refits):
        if not isinstance(r, dict):
            raise ScalingError(f"{where}: leave_one_budget_out.refits[{i}] must be an object")
        for k in PARAMS:
            _num(r, k, f"{where}: leave_one_budget_out.refits[{i}]")
    points = d.get("points", [])
    if not isinstance(points, list) or not all(isinstance(x, dict) for x in points):
        raise ScalingError(f"{where}: points must be a list of objects")
    fixed = d.get("fixed", [])
    if not isinstance(fixed, list) or not set(fixed) <= set(PARAMS):
        raise ScalingError(f"{where}: fixed must be a list of {', '.join(PARAMS)}")
    return ScalingLaw(params=params, points=tuple(points), loo=loo, provenance=str(d.get("provenance", "")),
                      data=data, n_range=ranges[0], d_range=ranges[1], fixed=tuple(fixed),
                      fit_info=d.get("fit") or {}, growth=_growth_from(d.get("growth"), where))


def _growth_from(g, where: str) -> dict:
    """The growth term of a scaling.json (absent: {}), its c and refits' cs checked."""
    if g is None:
        return {}
    if not isinstance(g, dict):
        raise ScalingError(f"{where}: growth must be an object with c")
    lo, hi = C_BOUNDS
    c = _num(g, "c", f"{where}: growth")
    loo = g.get("loo") or {}
    cs = loo.get("cs", []) if isinstance(loo, dict) else None
    if not isinstance(cs, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in cs):
        raise ScalingError(f"{where}: growth.loo.cs must be a list of numbers")
    if not all(lo <= v <= hi for v in [c, *cs]):
        raise ScalingError(f"{where}: growth c must be in [{lo:g}, {hi:g}], got {c!r}")
    return {**g, "loo": {**loo, "cs": cs}}


def load_law(path) -> ScalingLaw:
    """Read and validate scaling.json; a missing, unreadable or malformed file is one ScalingError line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ScalingError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ScalingError(f"{path}: not a text file") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScalingError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    return law_from_dict(d, str(path))


def prior_names() -> list[str]:
    from importlib.resources import files

    return sorted(p.name[:-5] for p in files("fastvit.priors").iterdir() if p.name.endswith(".json"))


def load_prior(name: str) -> ScalingLaw:
    """A shipped prior law (fastvit/priors/NAME.json): 'cpu' (our Imagenette runs) or 'gpu' (published
    ImageNet-1k ViT results)."""
    from importlib.resources import files

    known = prior_names()
    if name not in known:
        raise ScalingError(f"no shipped scaling prior {name!r}; known: {', '.join(known)}")
    res = files("fastvit.priors") / f"{name}.json"
    try:
        d = json.loads(res.read_text())
    except json.JSONDecodeError as e:
        raise ScalingError(f"prior {name}: not JSON ({e.msg})") from None
    return law_from_dict(d, f"prior {name}")


__all__ = ["FORM", "INTERVAL_METHOD", "PARAMS", "ScalingError", "ScalingLaw", "best_first", "choose", "credit", "fit_growth", "fit_law", "law_error",
           "law_from_dict", "law_to_dict", "load_law", "load_prior", "prior_names", "save_law"]
