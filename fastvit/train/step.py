"""One training step: augment → forward (bf16 on GPU) → soft-target loss → backward → clip → AdamW → EMA.

    step = TrainStep(parts, cfg.schedule, env)
    loss = step(images, labels, stage, lr=..., aug=S.aug_at(p, ...), images_seen=n)   # None: skipped (NaN/inf)

The EMA's time constant is a number of *images* (`EmaRate`), fixed for the run: its per-step decay
follows the batch size of the step, and its warm-up follows the images seen, so re-plans and
out-of-memory halvings do not change how far back the average reaches.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from fastvit.models.grow import set_blocks
from fastvit.stage import Stage

from .augment import mix_batch, randaugment_groups
from .checkpoint import rng_state, set_rng_state
from .schedules import AugStrength
from .setup import Parts, RunEnv


class EmaRate:
    """EMA decay of one step of `batch` images for a half-life in images: 0.5 ** (batch / half-life).
    Warm-up (counted in images, so a batch change does not move it): while few images have been seen
    the half-life is a tenth of them (at least one batch), so the average forgets the random
    initialisation quickly; the first step copies the weights."""

    def __init__(self, halflife_images: float):
        self.halflife_images = max(1.0, float(halflife_images))

    def decay(self, batch: int, images_seen: int | None = None) -> float:
        hl = self.halflife_images
        if images_seen is not None:
            if images_seen <= 0:
                return 0.0
            hl = min(hl, max(float(batch), 0.1 * images_seen))
        return 0.5 ** (batch / hl)


class TrainStep:
    def __init__(self, parts: Parts, schedule, env: RunEnv):
        self.p, self.sc, self.env = parts, schedule, env
        self.ema_rate: EmaRate | None = None      # set once the plan exists (its images give the half-life)
        self.nan_run = 0                          # NaN/inf steps in a row
        self.nan_total = 0
        self.blocks_override: tuple | None = None  # growth search: the supernet blocks this step runs

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, stage: Stage, *, lr: float,
                 aug: AugStrength, images_seen: int = 0, probe: bool = False) -> float | None:
        """images (B,3,r,r) uint8 on device, labels (B,). Returns the loss, or None when skipped.
        `images_seen`: training images before this step (the EMA's warm-up)."""
        if stage.patch_size is not None:
            raise ValueError(f"{stage}: a per-stage patch size is not applied by this trainer")
        p = self.p
        if stage.depth is not None or self.blocks_override is not None:      # progressive growth
            set_blocks(p.model, self.blocks_override if self.blocks_override is not None else range(stage.depth))
        for g in p.opt.param_groups:
            g["lr"] = lr
        if aug.randaug_mag > 0:
            images = randaugment_groups(images, aug.randaug_mag, self.sc.randaug_ops)
        images, targets = mix_batch(p.mixup, images, labels, aug.mix_prob)               # (B,3,r,r), (B,C)
        with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.env.amp):
            # the call form of the compiled graph: no keep argument for all patches
            logits = p.step_model(images, keep_rate=stage.keep) if stage.keep < 1.0 else p.step_model(images)
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()   # (B,C) -> ()
        loss.backward()
        clip = self.sc.clip_grad if self.sc.clip_grad > 0 else 1e12
        gnorm = torch.nn.utils.clip_grad_norm_(p.model.parameters(), clip)
        loss_v = loss.item()                                                             # SYNC
        if not (math.isfinite(loss_v) and torch.isfinite(gnorm).item()):
            p.opt.zero_grad(set_to_none=True)
            if not probe:
                self.nan_run += 1
                self.nan_total += 1
            return None
        p.opt.step()
        p.opt.zero_grad(set_to_none=True)
        if not probe:
            self.nan_run = 0
            if p.ema is not None:
                p.ema.decay = self.ema_rate.decay(stage.batch_size, images_seen)
                p.ema.update(p.model)               # applies exactly ema.decay (no step-counted warm-up)
        return loss_v

    def synthetic(self, stage: Stage, aug: AugStrength) -> None:
        """One step on random data of the stage's shape, LR 0 (the planner's compile + probe), synced."""
        dev = self.env.device
        x = torch.randint(0, 256, (stage.batch_size, 3, stage.res, stage.res), dtype=torch.uint8, device=dev)
        y = torch.randint(0, self.p.mixup.num_classes, (stage.batch_size,), device=dev)
        self(x, y, stage, lr=0.0, aug=aug, probe=True)
        if self.env.cuda:
            torch.cuda.synchronize()                                                     # SYNC

    def snapshot(self) -> dict:
        """Weights, optimizer state and RNG, to undo the probe's steps; kept in host memory, so the
        probe has the GPU memory the loop will have."""
        return {"model": _to_host(self.p.model.state_dict()), "opt": _to_host(self.p.opt.state_dict()),
                "rng": rng_state()}

    def restore(self, snap: dict) -> None:
        self.p.model.load_state_dict(snap["model"])
        self.p.opt.load_state_dict(snap["opt"])
        set_rng_state(snap["rng"])
        self.p.opt.zero_grad(set_to_none=True)
        if self.env.cuda:
            torch.cuda.empty_cache()


def _to_host(obj):
    """A copy of a (nested) state dict with every tensor in host memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)                                         # SYNC (on CUDA)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return copy.deepcopy(obj)
