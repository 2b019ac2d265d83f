"""The planner: turn a budget into stages with step counts.

A *stage* (fastvit.stage.Stage) is a run of steps with one (resolution, keep rate, batch size); each
covers a share [f0, f1) of the training window (the budget minus set-up and a reserve for the final checkpoint).
Steps follow from a measured speed: steps = share × window seconds × images/s / batch. With an image
budget (--epochs) steps follow from images alone and the speed does not matter.

Flow: `build_stages` (schedules → shapes) → `fit_and_probe` (compile + time each shape, counted; the
one out-of-memory policy, `BatchFallback`, halves a batch that does not fit) → `plan_budget` (→ Plan) → during the run `DriftMonitor` → `replan` when the real speed is more than 10% off
(or the run would end more than ~1% of the budget off it).
The Plan is saved in the run dir and in every checkpoint: given the plan, a run is reproducible.
"""
from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

from fastvit.stage import Stage

from . import schedules as S


class BudgetTooSmall(ValueError):
    """The budget leaves no time (or images) for training after set-up."""


def build_stages(*, curriculum: list[tuple[int, float]], keep_kind: str, keep_min: float,
                 keep_full_from: float, keep_cycles: int, keep_step: float, splits_per_stage: int,
                 base_batch: int, ref_res: int, const_tokens: bool, max_batch: int,
                 lr_rule: str, patch: int = 16, tokens: list[tuple[int, float]] | None = None) -> list[Stage]:
    """Cut [0, 1] at the curriculum's stage ends, split each stage into `splits_per_stage` equal parts
    (and at keep_full_from), evaluate the keep schedule at each part's middle, quantize, and merge
    neighbours that end up with the same shape. No steps yet. `tokens` [(patch, end)]: the token-size
    schedule, cut in too; a stage whose patch is not the model's carries it (Stage.patch_size) and its
    batch follows that patch's token count (const_tokens)."""
    cuts = {0.0, 1.0, keep_full_from} if 0 < keep_full_from < 1 else {0.0, 1.0}
    cuts.update(end for _, end in tokens or [])
    start = 0.0
    for res, end in curriculum:
        for i in range(1, splits_per_stage):
            cuts.add(start + (end - start) * i / splits_per_stage)
        cuts.add(end)
        start = end
    bounds = sorted(c for c in cuts if 0.0 <= c <= 1.0)
    segs: list[Stage] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a < 1e-9:
            continue
        mid = 0.5 * (a + b)
        res = S.res_at(mid, curriculum)
        keep = S.quantize_keep(S.keep_at(mid, kind=keep_kind, keep_min=keep_min,
                                         full_from=keep_full_from, cycles=keep_cycles), keep_step)
        q = S.patch_at(mid, tokens) if tokens else patch
        batch = S.batch_for(res, keep, base_batch=base_batch, ref_res=ref_res,
                            const_tokens=const_tokens, max_batch=max_batch, patch=q, ref_patch=patch)
        seg = Stage(res=res, keep=keep, batch_size=batch, patch_size=q if q != patch else None,
                    lr_scale=S.lr_scale_for_batch(batch, base_batch, lr_rule), f0=a, f1=b)
        if segs and segs[-1].shape == seg.shape:
            segs[-1] = replace(segs[-1], f1=b)
        else:
            segs.append(seg)
    return segs


@dataclass
class Plan:
    stages: list[Stage]
    mode: str                         # "time" | "images"
    budget_s: float | None = None
    budget_images: int | None = None
    setup_s: float = 0.0              # counted seconds before the first step (window start)
    reserve_s: float = 0.0            # kept back for the final checkpoint
    replans: list[dict] = field(default_factory=list)

    # -- queries ---------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @property
    def window_s(self) -> float:
        return (self.budget_s or 0.0) - self.setup_s - self.reserve_s

    def stage_at(self, step: int) -> tuple[int, int]:
        """(stage index, step within it) of global step `step` (0-based, < total_steps)."""
        acc = 0
        for k, s in enumerate(self.stages):
            if step < acc + s.steps:
                return k, step - acc
            acc += s.steps
        return len(self.stages) - 1, self.stages[-1].steps

    def progress_at(self, step: int) -> float:
        """Training-window progress f ∈ [0, 1] at the start of global step `step` (1 after the last)."""
        if step >= self.total_steps:
            return 1.0
        k, j = self.stage_at(step)
        s = self.stages[k]
        return s.f0 + (s.f1 - s.f0) * j / s.steps

    def images_until(self, step: int) -> int:
        acc, n = 0, 0
        for s in self.stages:
            take = min(s.steps, max(0, step - acc))
            n += take * s.batch_size
            acc += s.steps
        return n

    # -- (de)serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"stages": [s.to_dict() for s in self.stages], "mode": self.mode, "budget_s": self.budget_s,
                "budget_images": self.budget_images, "setup_s": self.setup_s, "reserve_s": self.reserve_s,
                "replans": list(self.replans), "total_steps": self.total_steps}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        d = dict(d)
        d.pop("total_steps", None)
        d.pop("growth", None)                 # plan.json of a --growth run: the Grower's record
        d["stages"] = [Stage.from_dict(s) for s in d.pop("stages", None) or d.pop("segments")]
        return cls(**d)

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _steps_for(share: float, seg: Stage, speed: float | None, window_s: float | None,
               budget_images: int | None) -> int:
    if budget_images is not None:
        return int(round(share * budget_images / seg.batch_size))
    return int(math.floor(share * window_s * speed / seg.batch_size + 0.5))


def plan_budget(stages: list[Stage], *, speeds: dict | None = None, budget_s: float | None = None,
                budget_images: int | None = None, setup_s: float = 0.0,
                reserve_s: float = 0.0) -> Plan:
    """Steps per stage so the run ends on the budget.

    Time budget: speeds[Stage.shape] = measured training images/s of that shape; the window is
    budget_s − setup_s (already spent) − reserve_s (final checkpoint). Image budget: steps from images.
    Stages that get no step are dropped, except that the last one keeps at least one step (the
    all-patches, final-resolution finish).
    """
    if (budget_s is None) == (budget_images is None):
        raise ValueError("give exactly one of budget_s and budget_images")
    mode = "time" if budget_s is not None else "images"
    window = None
    if mode == "time":
        window = budget_s - setup_s - reserve_s
        if window <= 0:
            raise BudgetTooSmall(f"set-up took {setup_s:.0f} s of the {budget_s:.0f} s budget; "
                                 "no time is left to train (raise --minutes/--hours)")
        speeds = speeds or {}
        missing = [s.shape for s in stages if s.shape not in speeds]
        if missing:
            raise ValueError(f"no measured speed for shapes {missing}")
    elif budget_images <= 0:
        raise BudgetTooSmall("the image budget is empty")
    out = []
    for s in stages:
        sp = speeds[s.shape] if mode == "time" else 0.0
        n = _steps_for(s.f1 - s.f0, s, sp, window, budget_images)
        out.append(replace(s, steps=n, speed=sp, probe_speed=sp))
    out = _drop_empty(out)
    return Plan(stages=out, mode=mode, budget_s=budget_s, budget_images=budget_images,
                setup_s=setup_s, reserve_s=reserve_s)


def _drop_empty(segs: list[Stage]) -> list[Stage]:
    if not segs:
        return segs
    last = segs[-1]
    kept = [s for s in segs[:-1] if s.steps > 0]
    kept.append(last if last.steps > 0 else replace(last, steps=1))
    # fold f-ranges of dropped stages into their successors so the window stays covered
    for i in range(1, len(kept)):
        if kept[i].f0 != kept[i - 1].f1:
            kept[i] = replace(kept[i], f0=kept[i - 1].f1)
    return kept


def drifted(planned_speed: float, measured_speed: float, tol: float = 0.10) -> bool:
    """True when the measured training speed is more than `tol` off the planned one."""
    if planned_speed <= 0 or measured_speed <= 0:
        return False
    return abs(measured_speed / planned_speed - 1.0) > tol


def replan(plan: Plan, *, step: int, counted_s: float, speed_ratio: float,
           new_batch: dict | None = None, base_batch: int | None = None, lr_rule: str | None = None) -> Plan:
    """Re-plan what is left after `step` steps at `counted_s` counted seconds.

    Steps already taken keep their stages (and progress values). The current stage is cut at
    `step`; the seconds really left (budget − reserve − counted_s) are shared by its remainder and the
    later stages in proportion to their remaining progress ranges, at their planned speed ×
    `speed_ratio` (measured / planned: the best evidence of how the rest will go). Progress continues
    from where the plan stood (no jump of the schedules either way): a run that is ahead gets more
    steps, one that is behind fewer, and both end on the budget. A stage left with no step is
    dropped and its progress range folded into its successor; the last stage keeps >= 1 step.
    `new_batch` {Stage.kind: batch} overrides batch sizes of remaining stages (out-of-memory fallback); their
    LR scale becomes lr_scale_for_batch(batch, base_batch, lr_rule), the rule the planned stages and
    the probe's fallback use. Only for time budgets (an image budget does not drift).
    """
    if plan.mode != "time":
        raise ValueError("only a time plan can be re-planned")
    if new_batch and (base_batch is None or lr_rule is None):
        raise ValueError("new_batch needs base_batch and lr_rule (the LR scaling rule of the run)")
    total = plan.total_steps
    if step >= total:
        return plan
    k, j = plan.stage_at(step)
    f_cur = plan.progress_at(step)
    time_left = max(0.0, (plan.budget_s or 0.0) - plan.reserve_s - counted_s)
    rest_share = max(1e-12, 1.0 - f_cur)
    done = list(plan.stages[:k])
    cur = plan.stages[k]
    if j > 0:
        done.append(replace(cur, f1=f_cur, steps=j))
    rest = [replace(cur, f0=f_cur)] + list(plan.stages[k + 1:])
    new_rest = []
    for s in rest:
        batch, lr_scale, probe = s.batch_size, s.lr_scale, s.probe_speed
        if new_batch and s.kind in new_batch and new_batch[s.kind] < batch:
            batch = new_batch[s.kind]
            lr_scale = S.lr_scale_for_batch(batch, base_batch, lr_rule)
            probe = 0.0                                      # that batch was never probed
        speed = s.speed * speed_ratio
        seconds = time_left * max(0.0, s.f1 - s.f0) / rest_share
        steps = int(math.floor(seconds * speed / batch + 0.5)) if speed > 0 else 0
        new_rest.append(replace(s, batch_size=batch, lr_scale=lr_scale, speed=speed, steps=steps, probe_speed=probe))
    new_rest = _drop_empty(new_rest)
    new_rest[0] = replace(new_rest[0], f0=f_cur)
    new = Plan(stages=done + new_rest, mode=plan.mode, budget_s=plan.budget_s,
               budget_images=plan.budget_images, setup_s=plan.setup_s, reserve_s=plan.reserve_s,
               replans=list(plan.replans))
    new.replans.append({"step": step, "counted_s": round(counted_s, 3), "speed_ratio": round(speed_ratio, 4),
                        "old_total": total, "new_total": new.total_steps})
    return new


def remaining_planned_s(plan: Plan, step: int) -> float:
    """Planned seconds of steps [step, total) at the plan's speeds (time plans)."""
    acc, t = 0, 0.0
    for s in plan.stages:
        todo = min(s.steps, max(0, acc + s.steps - step))
        if todo and s.speed > 0:
            t += todo * s.batch_size / s.speed
        acc += s.steps
    return t


class DriftMonitor:
    """Decides when the loop re-plans, from counted seconds and the plan's own speeds (no clock).

    Speed estimate: the plan's seconds for the steps since the last (re-)plan divided by the counted
    seconds they took (a cumulative, hence smoothed, measure; the first `skip` steps of a process are
    left out: loader start-up). It triggers when, after at least `min_span` measured seconds and
    `min_steps` steps, and at least `min_interval` counted seconds since the last re-plan:
      - drift: the measured speed is more than `tol` (10%) off the plan's, or
      - end error: at the measured speed the run would end more than `end_tol` seconds off the
        budget (catches start-up, checkpoint and probe errors below 10% that add up);
    Hysteresis: after a re-plan the measurement starts afresh, so a new one needs the drift to show
    again over a fresh span, and no sooner than min_interval (10% of the budget) later; near the end
    min_interval shrinks to a quarter of the time left (at least min_span) so a last correction can
    still land, while the end-error threshold keeps small late errors from re-planning at all.
    Last chance: an early end is the error nothing can fix once the plan's steps are gone (a re-plan
    on a momentary dip cuts the rest, the speed comes back, and the plan runs out before the next
    check could see it: bug 8, a 6-minute run ended at 281 s). So when, at the faster of the speed
    since the last re-plan and that of the last `min_steps` steps (a span may still hold the dip),
    the plan would run out less than min_span after the next regular check and early by more than
    the end-error threshold, it re-plans now, with that speed; min_steps steps after the last
    re-plan, or sooner when the plan has no more. The same, at the slower of the two speeds, when the
    plan would end late and the next regular check would come too late to cut it (min_span is 2 s:
    13% of a 15 s run). end_tol is 1% of the budget (its floor of 1 s was 7% of a 15 s run: bug 7).
    """

    def __init__(self, budget_s: float, *, tol: float = 0.10, skip: int = 2, min_steps: int = 5,
                 min_span: float | None = None, min_interval: float | None = None,
                 end_tol: float | None = None):
        self.budget_s = float(budget_s)
        self.tol = tol
        self.skip = skip
        self.min_steps = min_steps
        self.min_span = min_span if min_span is not None else min(600.0, max(2.0, 0.02 * budget_s))
        self.min_interval = min_interval if min_interval is not None else max(self.min_span, 0.10 * budget_s)
        self.end_tol = end_tol if end_tol is not None else 0.01 * budget_s
        self._start_step: int | None = None
        self._t0 = self._planned = 0.0
        self._n = 0
        self._last_replan_t = -math.inf
        self._seen = 0
        self._recent: deque = deque(maxlen=min_steps + 1)   # (counted s, planned s) of the last steps
        self._returned = 1.0                                 # the ratio check() last returned

    def restart(self, now: float) -> None:
        """After a re-plan: measure afresh (no start-up to skip: the loader keeps running)."""
        self._start_step, self._t0, self._planned, self._n = 0, now, 0.0, 0
        self._last_replan_t = now
        # the last steps in the new plan's seconds (its speeds are the old ones × the ratio)
        self._recent = deque(((t, p / self._returned) for t, p in self._recent), maxlen=self._recent.maxlen)
        self._returned = 1.0

    def step_done(self, now: float, planned_s: float) -> None:
        """One training step ended at counted second `now`; the plan gave it `planned_s` seconds."""
        self._seen += 1
        if self._start_step is None:
            if self._seen >= self.skip:
                self._start_step, self._t0 = 0, now
            return
        self._planned += planned_s
        self._n += 1
        self._recent.append((now, planned_s))

    def ratio(self, now: float, span: float | None = None) -> float | None:
        """Measured speed / planned speed since the last (re-)plan, once `min_steps` steps and `span`
        seconds (default min_span) were measured."""
        span = self.min_span if span is None else span
        if self._start_step is None or self._n < self.min_steps or now - self._t0 < span:
            return None
        return self._planned / max(1e-9, now - self._t0)

    def check(self, now: float, plan: Plan, step: int, reserve_s: float | None = None) -> float | None:
        """The speed ratio to re-plan with, or None to keep the plan."""
        if plan.mode != "time" or step >= plan.total_steps or len(self._recent) <= self.min_steps:
            return None
        r = self.ratio(now, span=0.0)          # since the last re-plan (None: too few steps yet)
        # the speed of the last min_steps steps: a span since a re-plan may still hold a dip
        r_last = sum(p for _, p in list(self._recent)[1:]) / max(1e-9, now - self._recent[0][0])
        end = self.budget_s - (plan.reserve_s if reserve_s is None else reserve_s)
        left = end - now
        interval = max(self.min_span, min(self.min_interval, 0.25 * max(0.0, left)))
        # an end error that later corrections can still fix waits: it must exceed 5% of the time left
        # (measurement noise over a span of several seconds is a few %), or end_tol near the end
        threshold = max(self.end_tol, 0.05 * left)
        planned = remaining_planned_s(plan, step)
        # last chance (after min_steps steps since the last re-plan, or sooner if the plan has no
        # more): the plan runs out early before the next regular check could correct it, or runs
        # late and that check would come only at the budget's end
        next_check = max(self._t0 + self.min_span, self._last_replan_t + interval)
        if r is not None or plan.total_steps - step <= self.min_steps - self._n:
            fast, slow = max(r or 0.0, r_last), min(r or math.inf, r_last)
            if now + planned / fast < min(next_check + self.min_span, end - threshold):
                self._returned = fast
                return fast
            if next_check > end - threshold and now + planned / slow > end + threshold:
                self._returned = slow
                return slow
        if r is None or now - self._t0 < self.min_span or now - self._last_replan_t < interval:
            return None
        if drifted(1.0, r, self.tol) or abs(now + planned / r - end) > threshold:
            self._returned = r
            return r
        return None


class OutOfMemory(Exception):
    """Even the smallest batch did not fit (BatchFallback.halve gave up)."""


@dataclass(frozen=True)
class BatchFallback:
    """The run's one out-of-memory policy (probe, compile, resume warm-up and mid-run alike): halve the
    batch of the shape that ran out of memory, scale its LR by the run's rule (lr_scale_for_batch
    against the reference batch), and give up below `min_batch` (mixup needs pairs). `multiple`: a
    halved batch is a multiple of it (2: mixup pairs; 2 × world under torchrun: even rank batches)."""
    base_batch: int
    lr_rule: str
    min_batch: int = 2
    multiple: int = 2

    def halve(self, stage: Stage) -> Stage:
        b = (stage.batch_size // 2) // self.multiple * self.multiple
        if b < max(self.min_batch, self.multiple):
            raise OutOfMemory(f"out of GPU memory even at batch {stage.batch_size} (res {stage.res}, keep "
                              f"{stage.keep:g}); use a smaller --model or --batch-size")
        return self.at_batch(stage, b)

    def at_batch(self, stage: Stage, b: int, **changes) -> Stage:
        """`stage` at batch `b`: its LR scale by the run's rule; never probed at that batch."""
        return replace(stage, batch_size=b, lr_scale=S.lr_scale_for_batch(b, self.base_batch, self.lr_rule),
                       probe_speed=0.0, **changes)

    def describe(self, old: Stage, new: Stage) -> str:
        return (f"out of GPU memory at res {old.res}, keep {old.keep:g}, batch {old.batch_size}: continuing "
                f"with batch {new.batch_size}, LR scale {old.lr_scale:g} -> {new.lr_scale:g} ({self.lr_rule} rule, "
                f"reference batch {self.base_batch})")


def fit_and_probe(stages: Iterable[Stage], run_step: Callable[[Stage], None], now: Callable[[], float], *,
                  fallback: BatchFallback, is_oom: Callable[[BaseException], bool],
                  on_halve: Callable[[Stage, Stage], None] = lambda old, new: None, warmup: int = 1,
                  iters: int = 3) -> tuple[list[Stage], dict]:
    """Run each distinct stage shape `warmup` times (the first call compiles its graph) and time `iters`
    more synchronous steps (`run_step(stage)`: one training step on synthetic data, at the stage's real
    batch). A shape that runs out of memory anywhere in that (compile included) is retried at half the
    batch (`fallback.halve`). Returns (the stages with their fitted batch and LR scale, speeds
    {shape: images/s} keyed by the fitted shapes; empty when iters == 0)."""
    fitted: dict = {}
    speeds: dict = {}
    for st in stages:
        if st.shape in fitted:
            continue
        cur = st
        while True:
            try:
                for _ in range(warmup):
                    run_step(cur)
                t0 = now()
                for _ in range(iters):
                    run_step(cur)
                dt = max(now() - t0, 1e-9)
                break
            except BaseException as e:               # noqa: BLE001 - only OOM is handled
                if not is_oom(e):
                    raise
                new = fallback.halve(cur)
                on_halve(cur, new)
                cur = new
        fitted[st.shape] = cur
        if iters:
            speeds[cur.shape] = iters * cur.batch_size / dt
    out = [replace(s, batch_size=fitted[s.shape].batch_size, lr_scale=fitted[s.shape].lr_scale)
           if fitted[s.shape].batch_size != s.batch_size else s for s in stages]
    return out, speeds


def halve_in_plan(plan: Plan, *, step: int, counted_s: float, fallback: BatchFallback) -> tuple[Plan, Stage, Stage]:
    """Out of memory at `step` mid-run: the stage in progress and every later one of its kind (res,
    keep, depth, patch size) continue at half its batch (the LR rescaled by the run's rule). Returns
    (new plan, old stage, new stage)."""
    old = plan.stages[plan.stage_at(step)[0]]
    new = fallback.halve(old)
    return shrink_batches(plan, step=step, counted_s=counted_s, new_batch={old.kind: new.batch_size},
                          fallback=fallback), old, new


def cut_at(plan: Plan, step: int) -> tuple[list[Stage], list[Stage]]:
    """The stages served before `step` and those from `step` on; the stage in progress is cut at `step`
    (the steps served keep their batch and their share of the window)."""
    k, j = plan.stage_at(step)
    f_cur = plan.progress_at(step)
    cur = plan.stages[k]
    done = list(plan.stages[:k]) + ([replace(cur, f1=f_cur, steps=j)] if j > 0 else [])
    rest = [replace(cur, f0=f_cur, steps=cur.steps - j)] + list(plan.stages[k + 1:])
    return done, rest


def shrink_batches(plan: Plan, *, step: int, counted_s: float, new_batch: dict, fallback: BatchFallback) -> Plan:
    """From `step` on, stages of a kind in `new_batch` {Stage.kind: batch} with a larger batch get that
    batch and its LR scale. The stage in progress is cut at `step` (the steps served keep their batch
    and their share of the window, as in `replan`), so progress and the images seen stay as they were.
    A time plan is re-planned from the seconds left (steps follow from the speed); an image plan keeps
    its images (more steps)."""
    if plan.mode == "time":
        return replan(plan, step=step, counted_s=counted_s, speed_ratio=1.0, new_batch=new_batch,
                      base_batch=fallback.base_batch, lr_rule=fallback.lr_rule)
    done, rest = cut_at(plan, step)
    out = []
    for s in rest:
        b = new_batch.get(s.kind)
        if b is not None and s.batch_size > b:
            s = fallback.at_batch(s, b, steps=max(1, int(round(s.steps * s.batch_size / b))))
        out.append(s)
    return replace(plan, stages=done + out)
