"""One training step: augment → forward (bf16 on GPU) → soft-target loss → backward → clip → AdamW → EMA.

    step = TrainStep(parts, cfg, env)
    loss = step(images, labels, stage, lr=..., aug=S.aug_at(p, ...), images_seen=n)   # None: skipped (NaN/inf)
    loss = step.poll()      # deferred mode (CUDA + fused AdamW): the interval's mean loss, read every N steps

Two ways to skip a step whose loss or gradient norm is NaN/inf (the weights and optimizer state stay as
they were):
- synchronous (CPU, or an optimizer without found_inf support): the loss is read each step (a SYNC)
  and the optimizer step is not called;
- deferred (a fused AdamW/Adam, the CUDA default): nothing is read. The finite check stays on the
  device and goes to the fused kernel as `found_inf` (as torch.amp.GradScaler does), which leaves
  parameters, moments and step count untouched; skipped steps, the run of them and the finite losses
  are counted on the device and read by `poll()` (the loop calls it at log steps, where the step
  timer's events are read anyway). A skipped step still moves the EMA towards the (unchanged) weights.

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
    def __init__(self, parts: Parts, cfg, env: RunEnv, deferred: bool | None = None):
        """`cfg`: the run's TrainConfig (a step reads cfg.optim.clip_grad and cfg.augment.randaug_ops)."""
        self.p, self.env = parts, env
        self.clip_grad, self.randaug_ops = cfg.optim.clip_grad, cfg.augment.randaug_ops
        self.ema_rate: EmaRate | None = None      # set once the plan exists (its images give the half-life)
        self.nan_run = 0                          # NaN/inf steps in a row (deferred: as of the last poll)
        self.nan_total = 0
        # deferred NaN check: needs an optimizer whose step takes found_inf (fused Adam/AdamW)
        supports = bool(getattr(parts.opt, "_step_supports_amp_scaling", False))
        self.deferred = (env.cuda and supports) if deferred is None else bool(deferred)
        if self.deferred and not supports:
            raise ValueError("deferred NaN checks need an optimizer with found_inf support (fused AdamW)")
        self.compile_s_by_shape: dict = {}      # Stage.shape -> seconds of its first step (the planner's)
        self._acc = None   # device: [skipped total, skipped run, finite loss sum, finite n, longest run since poll]
        self.blocks_override: tuple | None = None  # growth search: the supernet blocks this step runs

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, stage: Stage, *, lr: float,
                 aug: AugStrength, images_seen: int = 0, probe: bool = False) -> float | None:
        """images (B,3,r,r) uint8 on device, labels (B,). Returns the loss, or None when skipped.
        `images_seen`: training images before this step (the EMA's warm-up)."""
        # coarse-to-fine tokens: the stage's patch size (None: the model's) goes to the model's forward
        tok = {} if stage.patch_size is None else {"patch_size": stage.patch_size}
        p = self.p
        if stage.depth is not None or self.blocks_override is not None:      # progressive growth
            set_blocks(p.model, self.blocks_override if self.blocks_override is not None else range(stage.depth))
        for g in p.opt.param_groups:
            g["lr"] = lr
        if aug.randaug_mag > 0:
            images = randaugment_groups(images, aug.randaug_mag, self.randaug_ops)
        images, targets = mix_batch(p.mixup, images, labels, aug.mix_prob)               # (B,3,r,r), (B,C)
        with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.env.amp):
            # the call form of the compiled graph: no keep argument for all patches
            logits = (p.step_model(images, keep_rate=stage.keep, **tok) if stage.keep < 1.0
                      else p.step_model(images, **tok))
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()   # (B,C) -> ()
        loss.backward()
        clip = self.clip_grad if self.clip_grad > 0 else 1e12
        gnorm = torch.nn.utils.clip_grad_norm_(p.model.parameters(), clip)
        if self.deferred:
            return self._deferred_update(loss.detach(), gnorm, stage, images_seen, probe)
        loss_v = loss.item()                                                             # SYNC (synchronous mode)
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
            self._ema(stage, images_seen)
        return loss_v

    def _ema(self, stage: Stage, images_seen: int) -> None:
        if self.p.ema is not None:
            self.p.ema.decay = self.ema_rate.decay(stage.batch_size, images_seen)
            self.p.ema.update(self.p.model)         # applies exactly ema.decay (no step-counted warm-up)

    def _deferred_update(self, loss: torch.Tensor, gnorm: torch.Tensor, stage: Stage, images_seen: int,
                         probe: bool) -> None:
        """The optimizer step with the finite check on the device (no host sync); returns None (the
        loss is read by poll())."""
        p = self.p
        finite = torch.isfinite(loss) & torch.isfinite(gnorm)                            # () bool
        p.opt.found_inf = (~finite).to(torch.float32)   # the fused kernel skips the whole update when 1
        try:
            p.opt.step()
        finally:
            del p.opt.found_inf
        p.opt.zero_grad(set_to_none=True)
        if probe:
            return None
        if self._acc is None:
            self._acc = torch.zeros(5, dtype=torch.float64, device=loss.device)
        bad = (~finite).to(torch.float64)
        a = self._acc
        a[0] += bad                                                                      # skipped steps
        a[1] = (a[1] + 1.0) * bad                                                        # skipped in a row
        a[2] += torch.where(finite, loss.to(torch.float64), 0.0)                         # finite losses
        a[3] += finite.to(torch.float64)
        a[4] = torch.maximum(a[4], a[1])
        self._ema(stage, images_seen)
        return None

    def poll(self, loss: bool = True) -> float | None:
        """Deferred mode: read the device counters (one SYNC): updates nan_total and nan_run (the longest
        run of skipped steps since the last poll, so a run of NAN_LIMIT is seen even if it ended before
        the poll) and returns the mean finite loss since the last poll (None: no finite loss).
        loss=False (before a checkpoint: its count must be current): the counts only; the interval's
        loss and longest run carry on to the next poll. Synchronous mode: None."""
        if not self.deferred or self._acc is None:
            return None
        skipped, run, loss_sum, n, longest = self._acc.tolist()                          # SYNC (every N steps)
        self._acc[0] = 0.0
        self.nan_total += int(skipped)
        self.nan_run = int(longest)    # the longest run of skipped steps since the last poll
        if not loss:
            return None
        self._acc[2:4] = 0.0
        self._acc[4] = run
        return loss_sum / n if n else None

    def synthetic(self, stage: Stage, aug: AugStrength) -> None:
        """One step on random data of the stage's shape, LR 0 (the planner's compile + probe), synced."""
        dev = self.env.device
        b = stage.batch_size // self.env.dist.world                   # this rank's share of the global batch
        x = torch.randint(0, 256, (b, 3, stage.res, stage.res), dtype=torch.uint8, device=dev)
        y = torch.randint(0, self.p.mixup.num_classes, (b,), device=dev)
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
