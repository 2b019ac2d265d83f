"""Ranking and growth, as pure functions of measured numbers (As-ViT's search/grow.py, read by us).

    scores = rank_sum(kappas, lengths, images, speed_weight=1.0)   # lower is better
    i = best(scores, kappas, lengths)                              # ties: the measure with the larger range
    g = grow_choice(proposals, rows, min_images=...)               # one growth step, or None
    forecast_order(top1s, params); forecast_choice(...)           # the same by a scaling law's forecast

Ranks are dense and 0-based (equal values share a rank, the next value gets the next rank), as in
As-ViT. κ ascends (lower is better), L descends, images-in-budget descends. A NaN counts as the worst
value of its measure.
"""
from __future__ import annotations

import math
from typing import Sequence

# As-ViT grows until the parameters reach 80 M with a hard limit of 110 M; with measured time in place
# of parameters the limit is the fewest images a run must see, and growth stops once the chosen net
# sees fewer than LIMIT_SLACK times that (110/80: the same margin).
LIMIT_SLACK = 110.0 / 80.0


def _key(v: float, lower_is_better: bool) -> float:
    if v is None or math.isnan(v):
        return math.inf
    return v if lower_is_better else -v


def dense_ranks(values: Sequence[float], lower_is_better: bool) -> list[int]:
    """0-based dense ranks: [3.0, 1.0, 3.0, 2.0] ascending -> [2, 0, 2, 1]."""
    keys = [_key(v, lower_is_better) for v in values]
    order = sorted(set(keys))
    pos = {k: i for i, k in enumerate(order)}
    return [pos[k] for k in keys]


def rank_sum(kappas: Sequence[float], lengths: Sequence[float], images: Sequence[float] | None = None,
             speed_weight: float = 0.0) -> list[float]:
    """rank(κ ascending) + rank(L descending) + speed_weight · rank(images in budget descending)."""
    rk = dense_ranks(kappas, lower_is_better=True)
    rl = dense_ranks(lengths, lower_is_better=False)
    out = [float(a + b) for a, b in zip(rk, rl)]
    if images is not None and speed_weight:
        ri = dense_ranks(images, lower_is_better=False)
        out = [s + speed_weight * r for s, r in zip(out, ri)]
    return out


def relative_range(values: Sequence[float]) -> float:
    """(max − min) / max over the finite values (As-ViT's tie-break: the measure that varies more)."""
    vals = [abs(v) for v in values if v is not None and math.isfinite(v)]
    if not vals or max(vals) == 0:
        return 0.0
    return (max(vals) - min(vals)) / max(vals)


def best(scores: Sequence[float], kappas: Sequence[float], lengths: Sequence[float]) -> int:
    """Index of the lowest score; among tied lowest scores, the best by the measure with the larger
    relative range (κ lowest or L highest); then the first."""
    top = min(scores)
    tied = [i for i, s in enumerate(scores) if s == top]
    if len(tied) == 1:
        return tied[0]
    if relative_range(kappas) >= relative_range(lengths):
        return min(tied, key=lambda i: (_key(kappas[i], True), i))
    return min(tied, key=lambda i: (_key(lengths[i], False), i))


def order(scores: Sequence[float], kappas: Sequence[float], lengths: Sequence[float]) -> list[int]:
    """All indices best first: repeated `best` on what is left (stable for equal everything)."""
    left = list(range(len(scores)))
    out = []
    while left:
        j = best([scores[i] for i in left], [kappas[i] for i in left], [lengths[i] for i in left])
        out.append(left.pop(j))
    return out


def fits(images: float, min_images: float) -> bool:
    """A candidate is kept when it can see at least `min_images` training images in the budget."""
    return images is not None and images >= min_images


def grow_choice(rows: Sequence[dict], *, min_images: float, speed_weight: float = 0.0) -> int | None:
    """One growth step: rows = the proposals' measures ({'kappa','length','images'}); the ones that fit
    the budget are ranked among themselves; returns the index (into rows) of the chosen one, or None
    when none fits (growth ends)."""
    keep = [i for i, r in enumerate(rows) if fits(r["images"], min_images)]
    if not keep:
        return None
    k = [rows[i]["kappa"] for i in keep]
    ln = [rows[i]["length"] for i in keep]
    im = [rows[i]["images"] for i in keep]
    return keep[best(rank_sum(k, ln, im, speed_weight), k, ln)]


def growth_done(images: float, min_images: float, slack: float = LIMIT_SLACK) -> bool:
    """The grown net is as big as the budget affords: it sees fewer than slack × min_images images."""
    return images < slack * min_images


def forecast_order(top1s: Sequence[float | None], params: Sequence[float]) -> list[int]:
    """Indices best first by a forecast top-1 (higher first; None last), ties toward fewer parameters: the order
    fastvit.scaling.choose gives (its best_first)."""
    from fastvit.scaling import best_first

    return best_first(list(top1s), list(params))


def forecast_choice(top1s: Sequence[float | None], images: Sequence[float], params: Sequence[float], *,
                    min_images: float, beat: float | None = None) -> int | None:
    """One growth step by forecast: the proposal that fits the budget with the best forecast, if it beats `beat`
    (the current net's forecast; a bigger net the law does not expect to do better is no step); else None."""
    keep = [i for i in range(len(top1s)) if fits(images[i], min_images) and top1s[i] is not None]
    if not keep:
        return None
    i = keep[forecast_order([top1s[j] for j in keep], [params[j] for j in keep])[0]]
    return i if beat is None or top1s[i] > beat else None
