"""Evaluation: top-1 / top-5 of the raw and the EMA weights, in one pass over the same val batches.

Periodic evaluations during training are capped (`max_images`) and not counted in the budget; the
final one reads the whole val split. Every evaluation starts at the first image of the split's one
fixed shuffled order (fastvit.data's evaluation order), so a capped evaluation is a uniform sample and
each one sees the same images. Under torchrun each rank evaluates every world-th image of that order
(fastvit.data.order) and the hit counts are summed over the ranks (`Evaluator`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fastvit.data.dataset import DataError

from .errors import TrainError


@torch.no_grad()
def evaluate(models: dict[str, nn.Module], batches, *, device, amp: bool, max_images: int | None = None) -> dict:
    """{name: {top1, top5 (%), images}}, all patches. Every model sees the very same batches (raw and
    EMA weights compared on identical images). Stops after the batch that reaches `max_images`."""
    was = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    n = 0
    hits = {k: [0, 0] for k in models}                                                    # top-1, top-5
    for images, labels in batches:
        images = images.to(device, non_blocking=True)                                    # (B,3,r,r) uint8
        labels = labels.to(device, non_blocking=True)                                    # (B,)
        for k, m in models.items():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = m(images)                                                       # (B,C)
            top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices            # (B,k)
            hit = top.eq(labels.view(-1, 1))
            hits[k][0] += hit[:, 0].sum().item()                                         # SYNC
            hits[k][1] += hit.any(dim=1).sum().item()
        n += labels.numel()
        if max_images and n >= max_images:
            break
    for k, m in models.items():
        m.train(was[k])
    if n == 0:
        raise TrainError("the validation loader gave no images", 1)
    return {k: {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "images": n} for k, (c1, c5) in hits.items()}


class Evaluator:
    """The run's validations. The val loader is kept between evaluations while it stands at an epoch
    start, else reopened (a capped evaluation stops mid-epoch; the next one starts at image 0).
    `batch_size` is per process; under torchrun each rank reads its share of the split."""

    def __init__(self, env, *, batch_size: int, workers: int | None, loader_kwargs: dict):
        self.env = env
        d = env.dist
        self.kw = dict(res=env.final_res, batch_size=batch_size * d.world, **loader_kwargs)
        if d.enabled:
            self.kw["shard"] = d.shard
        if workers:
            self.kw["workers"] = workers
        self._val = None

    def _loader(self):
        from fastvit.data import make_val_loader

        v = self._val
        if v is not None and (getattr(v, "closed", False) or v.next_index % len(v) != 0):
            v.close()
            v = self._val = None
        if v is None:
            try:
                v = self._val = make_val_loader(self.env.source, **self.kw)   # resolved at set-up: trusted
            except (DataError, OSError) as e:   # val shard missing at this res, flat val/ for torchvision, ...
                raise self._error(e) from None
        return v

    def _error(self, e: Exception) -> TrainError:
        """One line; a file gone since set-up (OSError) reads like the data layer's own errors."""
        what = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.filename else e
        return TrainError(f"val loader ({self.env.backend}, {self.env.final_res} px): {what}", 2)

    def __call__(self, model: nn.Module, ema_model: nn.Module | None, max_images: int | None) -> dict:
        """{top1, top5, val_images[, ema_top1, ema_top5]} from the first image of the val split."""
        models = {"raw": model} if ema_model is None else {"raw": model, "ema": ema_model}
        d = self.env.dist
        cap = -(-max_images // d.world) if max_images else max_images          # this rank's share of the cap
        try:
            r = evaluate(models, self._loader(), device=self.env.device, amp=self.env.amp, max_images=cap)
        except (DataError, OSError) as e:   # a backend that opens its stream at the first batch
            self.close()
            raise self._error(e) from None
        if d.enabled:
            r = _summed_over_ranks(r, d, self.env.device)
        out = {"top1": r["raw"]["top1"], "top5": r["raw"]["top5"], "val_images": r["raw"]["images"]}
        if "ema" in r:
            out.update(ema_top1=r["ema"]["top1"], ema_top5=r["ema"]["top5"])
        return out

    def close(self) -> None:
        if self._val is not None:
            self._val.close()
            self._val = None


def _summed_over_ranks(r: dict, denv, device) -> dict:
    """evaluate()'s per-rank {name: {top1, top5, images}} → the same over the ranks' images together."""
    from .dist import all_sum

    names = sorted(r)
    vals = [x for k in names for x in (r[k]["top1"] * r[k]["images"] / 100.0, r[k]["top5"] * r[k]["images"] / 100.0,
                                       r[k]["images"])]
    tot = all_sum(vals, denv, device)
    out = {}
    for i, k in enumerate(names):
        c1, c5, n = (round(x) for x in tot[3 * i: 3 * i + 3])
        out[k] = {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "images": n}
    return out
