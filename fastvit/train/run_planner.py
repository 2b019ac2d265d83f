"""The plan's one owner during a run: `RunPlanner` builds the stages the config asks for, compiles and
probes them (counted), plans the budget, and makes every later plan -- a re-plan on drift, an
out-of-memory halving, the resume warm-up, growth's extra probes. `planner.py` holds the pure planning
maths it calls (stages, step counts, re-plans); this module binds them to a run's model and clock.

Nothing here assigns a plan: `first` and `resume` return one, `on_drift` and `on_oom` return a
`Proposal` (plan, why) that the loop adopts (`loop.Live.adopt`: broadcast, loader hand-over, drift
restart, drop-path refresh, plan.json). Growth proposes its plans the same way (growth.Grower).
"""
from __future__ import annotations

from typing import NamedTuple

from fastvit.stage import Stage, shallow_images

from . import dist
from . import schedules as S
from .errors import TrainError, is_oom
from .planner import (BatchFallback, BudgetTooSmall, OutOfMemory, Plan, build_stages, fit_and_probe, halve_in_plan,
                      plan_budget, replan, shrink_batches)
from .rules import budget_images, reserve_s


class Proposal(NamedTuple):
    """A new plan and the one line that says why; `reopen`: the loader reopens at the same step (a
    changed batch mid-stage) instead of taking the plan in place."""
    plan: Plan
    why: str
    reopen: bool = False


# ------------------------------------------------------------------------------------------------------
# the stages the config asks for (pure: config + data -> stages without steps)

def config_stages(cfg, env) -> list[Stage]:
    """The stages the config asks for (resolution curriculum × keep schedule × batch rule), no steps yet."""
    sc, kp = cfg.schedule, cfg.keep
    if cfg.run.recipe == "baseline":
        return [Stage(res=env.final_res, batch_size=sc.batch_size, keep=1.0, f0=0.0, f1=1.0)]
    patch = cfg.model.patch_size
    try:
        cur = S.parse_curriculum(cfg.data.curriculum) if cfg.data.curriculum else \
            S.default_curriculum(env.final_res, patch, cfg.data.curriculum_stages)
    except ValueError as e:
        raise TrainError(f"--curriculum {cfg.data.curriculum!r}: {e}", 2) from None
    bad = [r for r, _ in cur if r % patch]
    if bad:
        raise TrainError(f"curriculum resolutions {bad} are not multiples of the patch size {patch}", 2)
    tokens = token_schedule(cfg, cur)
    return build_stages(curriculum=cur, keep_kind=kp.keep_schedule, keep_min=kp.keep_min,
                        keep_full_from=kp.keep_full_from, keep_cycles=kp.keep_cycles, keep_step=kp.keep_step,
                        splits_per_stage=kp.keep_splits, base_batch=sc.batch_size, ref_res=env.final_res,
                        const_tokens=sc.const_tokens, max_batch=sc.max_batch, lr_rule=cfg.optim.lr_scaling, patch=patch,
                        tokens=tokens)


def token_schedule(cfg, curriculum) -> list[tuple[int, float]] | None:
    """--tokens parsed and checked against the curriculum: every resolution it meets is a multiple of
    its patch size there (coarse-to-fine tokens; None: the model's patch throughout)."""
    if not cfg.schedule.tokens:
        return None
    try:
        tokens = S.parse_tokens(cfg.schedule.tokens, cfg.model.patch_size)
    except ValueError as e:
        raise TrainError(f"--tokens {cfg.schedule.tokens!r}: {e}", 2) from None
    p = cfg.model.patch_size
    odd = [q for q, _ in tokens if q % p and p % q]
    if cfg.model.token_resize == "pool" and odd:
        raise TrainError(f"--tokens {cfg.schedule.tokens!r}: --token-resize pool needs patch sizes that divide or "
                         f"are multiples of {p}, got {odd[0]}", 2)
    cuts = sorted({0.0, *(e for _, e in tokens), *(e for _, e in curriculum)})
    bad = sorted({(S.res_at(m, curriculum), S.patch_at(m, tokens)) for m in
                  (0.5 * (a + b) for a, b in zip(cuts[:-1], cuts[1:]))
                  if S.res_at(m, curriculum) % S.patch_at(m, tokens)})
    if bad:
        raise TrainError(f"--tokens {cfg.schedule.tokens!r}: resolution {bad[0][0]} is not a multiple of patch "
                         f"{bad[0][1]} where the two schedules meet", 2)
    return tokens


def drop_path_rates(cfg, stages: list[Stage]) -> dict:
    """Drop-path rate per stage kind (res, keep, depth, patch size; a batch change keeps it), from the
    config's own stages (the middle of each one's window), not from re-planned ones whose cut ranges
    would move it: a compiled graph guards on the rate, so one rate per shape."""
    out: dict = {}
    for s in stages:
        out.setdefault(s.kind, S.aug_at(0.5 * (s.f0 + s.f1), drop_path=cfg.augment.drop_path).drop_path)
    return out


def probe_aug(cfg) -> S.AugStrength:
    """The augmentation a probe step runs at: the strongest the run will use (the slowest step)."""
    return S.aug_at(1.0, mix_prob=(max(cfg.augment.mix_prob),) * 2, randaug=(max(cfg.augment.randaug),) * 2)


# ------------------------------------------------------------------------------------------------------
# the planner bound to a run

class RunPlanner:
    """Plans of one run: its config, environment (setup.RunEnv), training step (step.TrainStep, with the
    parts it trains), budget clock and log line."""

    def __init__(self, cfg, env, step_fn, clock, say):
        self.cfg, self.env, self.step_fn, self.clock, self.say = cfg, env, step_fn, clock, say
        self.fallback = BatchFallback(cfg.schedule.batch_size, cfg.optim.lr_scaling, multiple=2 * env.dist.world)
        self._rates: dict = {}

    # -- stages --------------------------------------------------------------------------------------
    def stages(self, assign_depths=None) -> list[Stage]:
        """The config's stages (with growth's depths, `assign_depths(stages, resolutions)`), their
        drop-path rates fixed, every batch checked against the number of processes."""
        stages = config_stages(self.cfg, self.env)
        if assign_depths is not None:
            stages = assign_depths(stages, list(dict.fromkeys(s.res for s in stages)))
        self._rates = drop_path_rates(self.cfg, stages)
        dist.check_batch(self.env.dist, self.cfg.schedule.batch_size)   # every rank an equal, even share
        for s in stages:
            dist.check_batch(self.env.dist, s.batch_size, f"the batch {s.batch_size} of the stage at res {s.res}")
        return stages

    def drop_path(self, stage: Stage) -> float:
        """The drop-path rate a stage trains at: its kind's; a shape the config did not ask for (a growth
        candidate's depth) takes that of its stage (res and keep) at any depth."""
        if stage.kind not in self._rates:
            same = [r for k, r in self._rates.items() if k[:2] == stage.kind[:2]]
            self._rates[stage.kind] = same[0] if same else 0.0
        return self._rates[stage.kind]

    # -- plans ---------------------------------------------------------------------------------------
    def first(self, stages: list[Stage]) -> tuple[Plan, float]:
        """Compile + probe every shape (counted: the budget pays for it), then steps per stage. --epochs
        needs no speeds: one warm-up step per shape compiles it and fits its batch. Returns (plan,
        seconds spent compiling and probing)."""
        cfg = self.cfg
        timed = cfg.budget_s is not None
        (stages, speeds), spent = self.probe(stages, iters=cfg.budget.probe_iters if timed else 0)
        if not timed:
            return plan_budget(stages, budget_images=budget_images(cfg, self.env.ds.count("train"))), spent
        # the first loader stage is built after planning; its start-up is measured on the first steps
        # and handled by the drift check
        try:
            return plan_budget(stages, speeds=speeds, budget_s=cfg.budget_s, setup_s=self.clock.counted(),
                               reserve_s=reserve_s(cfg.budget_s)), spent
        except BudgetTooSmall as e:
            raise TrainError(str(e), 2) from None

    def resume(self, plan: Plan, step: int) -> tuple[Plan, float]:
        """--resume: compile the shapes still to come (a fresh process has no graphs). A batch that no
        longer fits (another GPU, other jobs) is halved in the plan from the resume step on."""
        if step >= plan.total_steps:
            return plan, 0.0
        k0, _ = plan.stage_at(step)
        todo = plan.stages[k0:]
        (fitted, _), spent = self.probe(todo)
        smaller = {f.kind: f.batch_size for s, f in zip(todo, fitted) if f.batch_size < s.batch_size}
        if smaller:
            plan = shrink_batches(plan, step=step, counted_s=self.clock.counted(), new_batch=smaller,
                                  fallback=self.fallback)
        return plan, spent

    def on_drift(self, plan: Plan, step: int, ratio: float, now: float) -> Proposal:
        """Re-plan from the seconds really left at the measured speed; the loader takes the new plan in
        place (same res and batch continue; a changed later stage is built in the background)."""
        new = replan(plan, step=step, counted_s=now, speed_ratio=ratio)
        return Proposal(new, f"re-plan at step {step} ({now:.0f} s): running at {ratio:.2f}× the planned speed; "
                             f"{plan.total_steps} → {new.total_steps} steps")

    def on_oom(self, plan: Plan, step: int, now: float) -> Proposal:
        """Out of GPU memory mid-run (on every rank: rank 0's counted seconds `now`): the one policy
        (halve this shape's batch, rescale its LR); the loader reopens at the same step."""
        try:
            new, old, smaller = halve_in_plan(plan, step=step, counted_s=now, fallback=self.fallback)
        except OutOfMemory as e:
            raise TrainError(str(e), 1) from None
        return Proposal(new, self.fallback.describe(old, smaller), reopen=True)

    # -- the probe -----------------------------------------------------------------------------------
    def probe(self, stages: list[Stage], iters: int = 0) -> tuple[tuple[list[Stage], dict], float]:
        """One synthetic step per distinct shape (its graph compiles at the first call, with the drop-path
        rate it will train at), then `iters` timed ones; batches that do not fit are halved. Weights,
        optimizer and RNG are restored afterwards. Returns ((stages, speeds), seconds spent)."""
        step_fn, clock, parts = self.step_fn, self.clock, self.step_fn.p
        t0 = clock.counted()
        snap = step_fn.snapshot()
        aug = probe_aug(self.cfg)
        n = len({s.shape for s in stages})
        self.say(f"{'probing' if iters else 'warming up'} {n} shape(s) (compile={'on' if self.env.compile else 'off'})")
        first_step_s = step_fn.compile_s_by_shape   # shape -> seconds of its first (compiling) step

        def run(stage: Stage) -> None:
            parts.drop_path.set(self.drop_path(stage))
            t = clock.now()
            dist.agreed_oom(lambda: step_fn.synthetic(stage, aug), self.env.dist, self.env.device, is_oom)
            first_step_s.setdefault(stage.shape, clock.now() - t)           # synced: its first call compiles

        def halved(old: Stage, new: Stage) -> None:
            self.say(self.fallback.describe(old, new))
            step_fn.restore(snap)

        try:
            got = fit_and_probe(stages, run, clock.now, fallback=self.fallback, is_oom=is_oom, on_halve=halved,
                                warmup=1, iters=iters)
        except OutOfMemory as e:
            raise TrainError(str(e), 1) from None
        finally:
            step_fn.restore(snap)
        spent = clock.counted() - t0
        self.say(f"compiled/probed {n} shape(s) in {spent:.1f} s (counted); first step per shape (compile + 1 "
                 "step): " + ", ".join(f"res {sh[0]} keep {sh[1]:g} batch {sh[2]} {t:.1f} s"
                                      for sh, t in first_step_s.items()))
        return got, spent


# ------------------------------------------------------------------------------------------------------
# speeds and images of a config without a run: fastvit-search, --model auto and --dry-run

def probe_config(cfg, env, stages: list[Stage] | None = None, *, clock=None, num_classes: int | None = None,
                 say=lambda m: None):
    """The planner's probe of cfg's model, built as a run builds it (setup.build_parts, step.TrainStep):
    `stages` (default: the ones the config asks for) compiled and timed on synthetic steps, weights
    restored. Returns (the stages with their fitted batches, {Stage.shape: images/s}, seconds)."""
    from .budget import BudgetClock
    from .setup import build_parts
    from .step import TrainStep

    clock = clock or BudgetClock(cfg.budget_s)
    parts = build_parts(cfg, env, num_classes or env.ds.num_classes)
    planner = RunPlanner(cfg, env, TrainStep(parts, cfg, env), clock, say)
    asked = planner.stages()
    (fitted, speeds), spent = planner.probe(asked if stages is None else stages,
                                            iters=max(1, cfg.budget.probe_iters))
    return fitted, speeds, spent


def images_in_budget(stages: list[Stage], speeds: dict, budget_s: float) -> int:
    """Training images the planner would fit into `budget_s` seconds at these speeds (0 when none)."""
    return images_split(stages, speeds, budget_s)[0]


def images_split(stages: list[Stage], speeds: dict, budget_s: float | None, shallower_than: int | None = None,
                 budget_images: int | None = None) -> tuple[int, dict]:
    """(images, {depth k: images seen at stages of depth k < `shallower_than`}: a growing run's shallow phase)
    that the planner would fit into `budget_s` seconds at these speeds, or into an image budget
    (`budget_images`, budget_s None) as a run plans it ((0, {}) when none)."""
    try:
        plan = plan_budget(stages, budget_images=budget_images) if budget_s is None else \
            plan_budget(stages, speeds=speeds, budget_s=budget_s, reserve_s=reserve_s(budget_s))
    except BudgetTooSmall:
        return 0, {}
    shallow = shallow_images([(s.depth, s.steps, s.batch_size) for s in plan.stages], shallower_than) \
        if shallower_than else {}
    return plan.images_until(plan.total_steps), shallow


# ------------------------------------------------------------------------------------------------------
# can the loader feed the plan? (fastvit.data.feed's per-core decode table)

def stage_rows(plan: Plan, n_train: int, backend: str, cores: int, gpu_bytes: float | None) -> list[dict]:
    """Per stage: its shape, steps, images and epochs, the step rate, and the loader against it: the feed
    rate of `backend` on `cores` cores from the per-core decode table (fastvit.data.feed; the training
    process keeps one core) and the data-bound verdict, or for gpu_resident whether the stage's shard
    fits in `gpu_bytes` (the --gpu-mem-share of the GPU's memory) and how long filling it takes."""
    from fastvit.data.feed import FeedError, feed_verdict, load_decode_table, per_core_rate, resident_bytes

    try:
        table = load_decode_table()
    except FeedError as e:
        table, table_err = {}, str(e)
    rows = []
    for k, s in enumerate(plan.stages):
        images = s.steps * s.batch_size
        step = s.speed if s.speed > 0 else None
        rb = resident_bytes(n_train, s.res)
        row = {"stage": k + 1, "res": s.res, "keep": s.keep, "depth": s.depth, "batch": s.batch_size,
               "steps": s.steps, "images": images, "epochs": images / max(1, n_train), "step_img_s": step,
               "resident_gb": rb / 1e9, "feed_img_s": None, "data_bound": None}
        try:
            if not table:
                raise FeedError(table_err)
            if backend == "gpu_resident":
                fill = per_core_rate(table.get("ffcv") or next(iter(table.values())), s.res) * max(1, cores - 1)
                fits = gpu_bytes is not None and rb <= gpu_bytes
                row["data_bound"] = False if fits else None
                row["note"] = (f"resident: {rb / 1e9:.1f} GB of the {gpu_bytes / 1e9:.0f} GB share, filled once in "
                               f"~{n_train / fill:,.0f} s by {max(1, cores - 1)} decode workers" if fits else
                               f"does not fit resident ({rb / 1e9:.1f} GB > "
                               f"{(gpu_bytes or 0) / 1e9:.0f} GB share): streams with the best streaming loader")
            elif step:
                v = feed_verdict(backend, s.res, step, cores, table, n=n_train, gpu_free_bytes=gpu_bytes)
                row.update(feed_img_s=v["feed_img_s"], data_bound=v["data_bound"], note=v["note"])
        except FeedError as e:
            row["note"] = f"no feed estimate: {e}"
        rows.append(row)
    return rows


def data_bound_lines(plan: Plan, env, cfg) -> list[str]:
    """A run's own plan: one line per stage the loader cannot feed on this machine's cores, by the
    per-core decode table; none when every stage is fed (or nothing can be said)."""
    import os

    if plan.mode != "time":
        return []
    cores = cfg.data.workers + 1 if cfg.data.workers else len(os.sched_getaffinity(0))   # the loader's + the trainer's
    rows = stage_rows(plan, env.ds.count("train"), env.backend, cores, gpu_share_bytes(cfg, env))
    return [f"stage {r['stage']} (res {r['res']}): {r['note']}" for r in rows if r["data_bound"]]


def gpu_share_bytes(cfg, env) -> int | None:
    """The GPU memory resident shards may take here: --gpu-mem-share of the GPU's (None on a CPU)."""
    if not env.cuda:
        return None
    from fastvit.data.backend_resident import memory_cap

    return memory_cap(env.device, cfg.data.loader.gpu_mem_share)
