"""Schedules: pure functions of training progress p ∈ [0, 1].

p is the plan's progress, `Plan.progress_at(step)`: the share of the training window that the plan
puts before this step. The training window is the budget minus the set-up (loading, compiling, the
planner's probe: counted, but no schedule runs during it) and the final checkpoint's reserve; with
--epochs it is the image budget. Each stage covers a share [f0, f1) of the window and its steps divide
it evenly; re-plans keep p continuous and follow the clock, so p tracks counted training seconds /
window to within the drift tolerance. It is what the log's `p` is. Nothing here reads a clock or holds
state: the planner and the tests call the same functions, and a run is reproducible from its plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from fastvit.stage import num_kept

KEEP_KINDS = ("fixed", "linear", "cyclic", "cosine")
LR_DECAYS = ("cosine", "linear", "constant")


# --- learning rate -----------------------------------------------------------------------------

def lr_at(p: float, *, base_lr: float, warmup: float = 0.05, decay: str = "cosine") -> float:
    """Linear warm-up over the first `warmup` of progress, then linear or cosine decay to exactly 0 at
    p = 1 ("Budgeted Training", Li et al. 2020: a budget-aware schedule that reaches zero at the end of
    the budget beats truncating a longer one).

    decay "constant": no decay after the warm-up, base_lr through p = 1: the stable trunk of a
    warmup-stable-decay run (Hägele et al. 2024), from whose checkpoints short decay branches (warmup 0,
    linear: base_lr → 0 over the branch) give each budget's point (fastvit-sweep --schedule wsd)."""
    if decay not in LR_DECAYS:
        raise ValueError(f"lr decay must be one of {LR_DECAYS}, got {decay!r}")
    p = min(max(p, 0.0), 1.0)
    if decay == "constant":
        return base_lr * p / warmup if warmup > 0 and p < warmup else base_lr
    if p >= 1.0:
        return 0.0
    if warmup > 0 and p < warmup:
        return base_lr * p / warmup
    q = (p - warmup) / (1.0 - warmup) if warmup < 1 else 1.0   # decay progress, 0 → 1
    if decay == "linear":
        return base_lr * (1.0 - q)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * q))


def lr_scale_for_batch(batch: int, base_batch: int, rule: str = "linear") -> float:
    """LR multiplier when a stage's batch differs from the reference batch (Goyal et al.: linear;
    sqrt is the safer choice for Adam-type optimizers at large batch)."""
    if rule == "none":
        return 1.0
    r = batch / base_batch
    if rule == "linear":
        return r
    if rule == "sqrt":
        return math.sqrt(r)
    raise ValueError(f"lr scaling rule must be linear, sqrt or none, got {rule!r}")


# --- resolution curriculum ---------------------------------------------------------------------

def default_curriculum(final_res: int, patch: int = 16, n: int = 3) -> list[tuple[int, float]]:
    """[(res, end_fraction), ...]: n stages rising to final_res, each res a multiple of `patch`.

    From the seeds (FFCV's progressive resizing, the 1-GPU-day paper's 32→224 curriculum): most of the
    budget at low resolution, where a step is cheap, the last quarter at the final resolution so the
    model meets the test-time statistics (the train/test resolution discrepancy, Touvron et al. 2019).
    Fractions 0.4 / 0.35 / 0.25 for three stages.
    """
    if n <= 1:
        return [(final_res, 1.0)]
    lo = max(patch * 2, final_res // 2)
    ress = [int(round((lo + (final_res - lo) * i / (n - 1)) / patch) * patch) for i in range(n)]
    ress[-1] = final_res
    if n == 3:
        ends = [0.40, 0.75, 1.0]
    else:
        last = 0.25
        ends = [(1 - last) * (i + 1) / (n - 1) for i in range(n - 1)] + [1.0]
    out: list[tuple[int, float]] = []
    for r, e in zip(ress, ends):
        if out and out[-1][0] == r:       # tiny final res: ladder collapses, merge equal stages
            out[-1] = (r, e)
        else:
            out.append((r, e))
    return out


def parse_curriculum(text: str) -> list[tuple[int, float]]:
    """'64:0.4,128:0.35,224:0.25' (res:share of the budget) → [(64, 0.4), (128, 0.75), (224, 1.0)]."""
    pairs = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        res_s, _, share_s = item.partition(":")
        res = int(res_s)
        share = float(share_s) if share_s else None
        pairs.append((res, share))
    if not pairs:
        raise ValueError("empty curriculum")
    if any(s is None for _, s in pairs):
        if not all(s is None for _, s in pairs):
            raise ValueError("give a share for every stage or for none")
        pairs = [(r, 1.0 / len(pairs)) for r, _ in pairs]
    total = sum(s for _, s in pairs)
    if any(s <= 0 for _, s in pairs) or any(r <= 0 for r, _ in pairs):
        raise ValueError("resolutions and shares must be positive")
    ends, acc = [], 0.0
    for r, s in pairs:
        acc += s / total
        ends.append((r, acc))
    ends[-1] = (ends[-1][0], 1.0)
    return ends


def res_at(p: float, curriculum: list[tuple[int, float]]) -> int:
    """Resolution of the curriculum stage that contains p (stages are [prev_end, end))."""
    for res, end in curriculum:
        if p < end:
            return res
    return curriculum[-1][0]


# --- patch keep rate (PSS) ---------------------------------------------------------------------

def keep_at(p: float, *, kind: str = "linear", keep_min: float = 0.5, keep_max: float = 1.0,
            full_from: float = 0.8, cycles: int = 4) -> float:
    """Share of patches the model sees at progress p; all of them (1.0) from `full_from` on.

    fixed: keep_min until full_from.  linear / cosine: keep_min → keep_max over [0, full_from).
    cyclic: `cycles` triangle waves keep_min → keep_max → keep_min over [0, full_from) (PSS's cyclic
    schedule: alternate cheap and full-information steps).
    """
    if kind not in KEEP_KINDS:
        raise ValueError(f"keep schedule must be one of {KEEP_KINDS}, got {kind!r}")
    if p >= full_from:
        return 1.0
    q = p / full_from if full_from > 0 else 1.0
    span = keep_max - keep_min
    if kind == "fixed":
        return keep_min
    if kind == "linear":
        return keep_min + span * q
    if kind == "cosine":
        return keep_min + span * 0.5 * (1.0 - math.cos(math.pi * q))
    phase = (q * cycles) % 1.0                       # cyclic
    return keep_min + span * (1.0 - abs(2.0 * phase - 1.0))


def quantize_keep(keep: float, step: float = 0.125) -> float:
    """Round a keep rate up to a multiple of `step` (never to 0): each distinct keep count is one
    compiled shape, so a continuous schedule becomes a few levels."""
    if keep >= 1.0:
        return 1.0
    return min(1.0, max(step, math.ceil(keep / step - 1e-9) * step))


def keep_count(res: int, keep: float, patch: int = 16) -> int:
    """Number of patches kept of the (res/patch)² grid: fastvit.stage.num_kept, the model's own rule."""
    return num_kept((res // patch) ** 2, keep)


# --- batch per stage ---------------------------------------------------------------------------

def batch_for(res: int, keep: float, *, base_batch: int, ref_res: int, const_tokens: bool,
              max_batch: int, patch: int = 16, multiple: int = 8, ref_patch: int | None = None) -> int:
    """Batch size of a stage. With const_tokens the number of tokens per batch stays that of
    base_batch at (ref_res, keep 1): small images / few kept patches → bigger batches that keep the
    GPU busy; a coarser patch than the reference one's (`ref_patch`, default `patch`: coarse-to-fine
    tokens) has fewer tokens per image, so a bigger batch. Rounded down to a multiple of `multiple`
    (even, for mixup), capped at max_batch."""
    if not const_tokens:
        return base_batch
    ref_tokens = (ref_res // (ref_patch or patch)) ** 2
    tokens = keep_count(res, keep, patch)
    b = base_batch * ref_tokens / tokens
    b = int(b // multiple * multiple)
    return max(min(base_batch, multiple), min(max_batch, b))


# --- augmentation strength ---------------------------------------------------------------------

@dataclass(frozen=True)
class AugStrength:
    mix_prob: float       # probability that a batch gets mixup/cutmix (timm Mixup `prob`)
    randaug_mag: float    # RandAugment magnitude (0 = off), torchvision scale 0..30 (10 = "m10")
    drop_path: float      # stochastic depth rate of the last block


def ramp(p: float, start: float, end: float) -> float:
    """Linear ramp start → end over p ∈ [0, 1]."""
    p = min(max(p, 0.0), 1.0)
    return start + (end - start) * p


def aug_at(p: float, *, mix_prob: tuple[float, float] = (0.0, 0.8),
           randaug: tuple[float, float] = (0.0, 0.0),
           drop_path: tuple[float, float] = (0.1, 0.1)) -> AugStrength:
    """Augmentation strength at p: each (start, end) ramps linearly (EfficientNetV2's progressive
    learning: weak regularization with small images early, strong with large images late)."""
    return AugStrength(mix_prob=ramp(p, *mix_prob), randaug_mag=ramp(p, *randaug),
                       drop_path=ramp(p, *drop_path))


# --- token size (coarse-to-fine tokens) ----------------------------------------------------------

def parse_tokens(text: str, model_patch: int) -> list[tuple[int, float]]:
    """'32:0.3,16:0.7' (patch:share of the budget) -> [(32, 0.3), (16, 1.0)]: coarse tokens early, the
    model's own patch at the end (the evaluation tokenizes with it). Shares as in parse_curriculum."""
    tokens = parse_curriculum(text)
    if tokens[-1][0] != model_patch:
        raise ValueError(f"the last token size must be the model's patch size {model_patch}, got {tokens[-1][0]}")
    return tokens


def patch_at(p: float, tokens: list[tuple[int, float]]) -> int:
    """Patch size of the token stage that contains p (stages are [prev_end, end)), as res_at."""
    return res_at(p, tokens)
