"""The training run, top to bottom: build → plan → loop → finish.

    build   run dir (rundir), data + device + backend (setup.open_env), model, optimizer, EMA, mixup
            (setup.build_parts), one training step (step.TrainStep), the stages the config asks for
    plan    compile + probe every stage shape on synthetic data (counted; planner.fit_and_probe with its
            one out-of-memory policy), then steps per stage so the run ends on the budget (plan_budget)
    loop    the CurriculumLoader says what each step trains on (its Stage: res, keep, batch, LR scale);
            schedules(p) → step → log / re-plan on drift / checkpoint / periodic validation (not counted)
    finish  final checkpoint (the end of the counted time) → full validation, raw and EMA →
            results.json, curves.png

Progress `p` is the plan's: the share of the training window (budget − set-up − final-checkpoint
reserve) that the plan puts before this step, `plan.progress_at(step)`. The schedules read it and the
log's `p` is it. Re-plans keep it continuous and track the clock, so it stays within a few percent of
counted seconds / budget over the window; with --epochs it is the share of the image budget.

Faults: `train()` holds RUN_DIR/.lock and a SIGTERM handler for the run. A SIGTERM in the loop is seen
after the step in flight, elsewhere (set-up, probe, validation) it stops the run at once; a run stopped
early writes a checkpoint of what it trained first (`_stopped`) and exits 143 (SIGTERM) or with its
error's code. Checkpoints are due every min(--ckpt-minutes, 5% of the budget), at least 30 s apart
(`CheckpointSchedule`).

Sync points with the GPU are marked `# SYNC`. The budget (counted seconds) is read from BudgetClock only.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from fastvit.data.dataset import DataError
from fastvit.stage import Stage

from . import dist, rundir
from . import schedules as S
from .budget import BudgetClock
from .checkpoint import CheckpointSchedule, checkpoint_paths, init_parts_from, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .errors import CheckpointFailed, TrainError, is_oom
from .evaluate import Evaluator
from .growth import Grower
from .metrics import MetricsWriter, StepMeter, StepTimer, plot_curves
from .profile import BusyWindow
from .planner import (BatchFallback, BudgetTooSmall, DriftMonitor, OutOfMemory, Plan, build_stages,
                      fit_and_probe, halve_in_plan, plan_budget, replan, shrink_batches)
from .setup import Parts, RunEnv, build_parts, device_name, open_env, seed_everything
from .signals import Terminated, TermGuard
from .step import EmaRate, TrainStep

NAN_LIMIT = 10


@dataclass
class RunState:
    """What a checkpoint carries besides weights and optimizer: where the run is and what it spent."""
    plan: Plan
    step: int = 0
    evals_done: int = 0
    val_s: float = 0.0                 # seconds of validation (not counted)
    compile_s: float = 0.0             # seconds of compile + probe (counted)
    ema_halflife_images: float = 0.0   # the EMA's time constant, fixed for the run


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, log=None, clock=None,
          ignored_flags=()) -> dict:
    """One run in cfg.run.out, holding the run dir's lock and the SIGTERM handler (both released when it
    returns): build → plan → loop → finish (`_run`)."""
    guard = TermGuard()
    denv = dist.DistEnv.from_environ()                  # under torchrun: this rank; else world 1
    with dist.run_lock(denv, Path(cfg.run.out)) as lock:
        try:
            guard.install()
            return _run(cfg, lock, guard, resume=resume, overwrite=overwrite, say=dist.main_only(denv, _prefixed(log)),
                        clock=clock, ignored_flags=ignored_flags, denv=denv)
        except Terminated as e:
            if not e.bare:
                raise
            raise Terminated("terminated before training (set-up, compile or probe): nothing new trained; "
                             "continue with --resume") from None
        finally:
            guard.restore()
            dist.destroy(denv)


def _run(cfg: TrainConfig, lock, guard: TermGuard, *, resume: bool, overwrite: bool, say, clock,
         ignored_flags, denv: dist.DistEnv = dist.SINGLE) -> dict:
    run_dir = Path(cfg.run.out)
    main = denv.is_main                                   # rank 0 owns the clock, the plan and the files
    # ---- build ---------------------------------------------------------------------------------------
    ck = rundir.open_for_resume(run_dir, say) if resume else None
    saved = ck["config"] if ck else rundir.saved_config(run_dir) if resume else None
    if saved:                                             # the run's own config wins (a killed run's too)
        cfg = _saved_config(saved, cfg, ignored_flags, say)
    if not ck:
        rundir.no_checkpoint(run_dir, resume, cfg.has_budget, say)
    prior = [] if ck else rundir.previous_run(run_dir, overwrite, restart=resume)
    clock = BudgetClock(cfg.budget_s, counted_s=ck["counted_s"] if ck else 0.0, **({"clock": clock} if clock else {}))
    env = open_env(cfg, denv)                             # data, device, backend: checked before any compute
    if env.backend_why:
        say(env.backend_why)                              # backend auto: which one, in one line
    dist.init(denv, env.device)                           # torchrun: join the process group (gloo / NCCL)
    dist.check_resume(denv, env.device, ck, say)
    if not ck:
        seed_everything(cfg.run.seed)
    if env.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    parts = build_parts(cfg, env, env.ds.num_classes)
    if cfg.run.init_from and not ck:                      # a warmup-stable-decay branch (or trunk segment)
        init_parts_from(cfg.run.init_from, parts, say)
    step_fn = TrainStep(parts, cfg.schedule, env)
    grower = Grower(cfg, parts, step_fn, env, say)       # --growth: the depth per stage (growth.py)
    save_plan = partial(_save_plan, run_dir, main=main, grower=grower)   # plan.json (rank 0), growth record
    stages = config_stages(cfg, env)
    stages = grower.assign_depths(stages, list(dict.fromkeys(s.res for s in stages)))
    drop_path_of = drop_path_rates(cfg, stages)
    fallback = BatchFallback(cfg.schedule.batch_size, cfg.schedule.lr_scaling, multiple=2 * denv.world)
    dist.check_batch(denv, cfg.schedule.batch_size)       # every rank an equal, even share of each batch
    for s in stages:
        dist.check_batch(denv, s.batch_size, f"the batch {s.batch_size} of the stage at res {s.res}")
    if main:
        rundir.start(run_dir, prior, say, lock)           # every setting checked: a previous run may go now
    # ---- plan ----------------------------------------------------------------------------------------
    if ck:
        st = _restore(ck, parts, step_fn)
        st.compile_s += _rewarm(st, cfg, step_fn, parts, drop_path_of, fallback, clock, say)
        st.plan = dist.broadcast_object(st.plan, denv, env.device)          # rank 0's plan on every rank
    else:
        plan, spent = make_plan(stages, cfg, env, step_fn, parts, drop_path_of, fallback, clock, say)
        plan, spent = dist.broadcast_object((plan, spent), denv, env.device)  # rank 0's probe and plan
        st = RunState(plan=plan, compile_s=spent)
        if main:
            rundir.write_json(run_dir, "config.json", cfg.to_dict())
    if grower.on:                                         # the model at the run's depth; auto's probe
        grower.load_state_dict(ck.get("growth") if ck else None)
        grower.probe = partial(_probe_more, st, cfg, step_fn, parts, drop_path_of, fallback, clock, say, grower)
        grower.begin(st.plan, st.step)
    # the EMA's half-life in images: a share of the first plan's images, kept in every checkpoint (a
    # checkpoint of the first release has none: then the share of its plan's)
    st.ema_halflife_images = st.ema_halflife_images or \
        cfg.schedule.ema_halflife * st.plan.images_until(st.plan.total_steps)
    step_fn.ema_rate = EmaRate(st.ema_halflife_images)
    dist.seed_rank(denv, cfg.run.seed, st.step)           # torchrun: each rank its own patch draws, mixup
    for s in st.plan.stages:                              # a run resumed on another number of processes
        dist.check_batch(denv, s.batch_size, f"the planned batch {s.batch_size} (res {s.res})")
    save_plan(st.plan)
    say(f"device {env.device} ({device_name(env)}), backend {env.backend}, recipe {cfg.run.recipe}, "
        f"model {cfg.model.name}, final res {env.final_res}" +
        (f", {denv.world} processes (global batch {cfg.schedule.batch_size})" if denv.enabled else ""))
    say("plan: " + ", ".join(f"res {s.res} keep {s.keep:g}{f' depth {s.depth}' if s.depth else ''} batch "
                             f"{s.batch_size} × {s.steps}" for s in st.plan.stages)
        + f" = {st.plan.total_steps} steps")
    # ---- loop ----------------------------------------------------------------------------------------
    metrics = MetricsWriter(run_dir, resume_step=st.step if ck else None) if main else dist.NoMetrics()
    evaluator = Evaluator(env, batch_size=max(16, min(256, cfg.schedule.batch_size)), workers=cfg.data.workers,
                          loader_kwargs=cfg.data.loader_kwargs())
    meter = StepMeter(StepTimer(env.cuda, clock.now), window=max(20, 2 * cfg.run.log_every),
                      flops_per_image=lambda s: _flops(parts.model, s), peak_flops=_peak(env), now=clock.counted())
    drift = DriftMonitor(cfg.budget_s or 1.0, tol=cfg.budget.replan_tol)
    bar = _progress_bar(cfg, st, main)
    loader = _open_loader(st, cfg, env) if st.step < st.plan.total_steps else None
    ckpt = CheckpointSchedule(minutes=cfg.run.ckpt_minutes, every_steps=cfg.run.ckpt_every_steps,
                              budget_s=cfg.budget_s, step=st.step, now=clock.counted())
    save = partial(_save, run_dir, cfg, parts, step_fn, st, clock, ckpt, grower, denv)
    agree = dist.StepAgreement(denv, env.device)          # world 1: no collective, the values as they are
    cur_shape = None
    busy = BusyWindow(cfg.run.profile_steps, skip=min(20, max(1, cfg.run.profile_steps // 4)), cuda=env.cuda)
    loop_t0, loop_step0 = clock.counted(), st.step
    try:
        with guard.deferring():                                          # a SIGTERM: after the step in flight
            while st.step < st.plan.total_steps:
                images, labels, stage = _next_batch(loader, st.step, env)    # what this step trains on
                # images (B,3,r,r) uint8, labels (B,) int64, B = stage.batch_size, r = stage.res
                if grower.on:                                            # a growth, auto's window (counted)
                    stage = grower.before_step(st, stage, clock)
                    if grower.plan_changed:                              # rank 0's re-plan on every rank
                        st.plan = dist.broadcast_object(st.plan, denv, env.device)
                        loader = _take_plan(st, loader, cfg, env, bar, say)
                        grower.add_rates(drop_path_of, st.plan.stages)
                        drift.restart(clock.counted())
                        save_plan(st.plan)
                        cur_shape = None
                if stage.shape != cur_shape:                             # a stage change: its drop-path rate
                    cur_shape = stage.shape
                    parts.drop_path.set(drop_path_of[stage.kind])
                    meter.new_stage()
                    _log_profile(metrics, busy.new_stage(stage), st.step)    # --profile-steps: GPU-busy window
                p = st.plan.progress_at(st.step)                         # the one progress (see above)
                lr = S.lr_at(p, base_lr=cfg.schedule.lr, warmup=cfg.schedule.warmup, decay=cfg.schedule.lr_decay)
                aug = S.aug_at(p, mix_prob=cfg.schedule.mix_prob, randaug=cfg.schedule.randaug,
                               drop_path=cfg.schedule.drop_path)
                meter.timer.start()
                try:
                    loss = step_fn(images.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True),
                                   stage, lr=lr * stage.lr_scale, aug=aug, images_seen=st.plan.images_until(st.step))
                except Exception as e:  # noqa: BLE001 - only out-of-memory is handled
                    meter.timer.cancel()
                    if not is_oom(e):
                        raise
                    now = agree(loss=None, oom=True, term=False, ratio=None, now=clock.counted(), ckpt=False).now
                    loader = _out_of_memory(st, loader, cfg, env, parts, fallback, now, say)
                    save_plan(st.plan)
                    cur_shape = None
                    continue
                meter.timer.stop()                                       # the EMA update is inside the span
                if step_fn.deferred and ((st.step + 1) % cfg.run.log_every == 0 or st.step + 1 == st.plan.total_steps):
                    loss = step_fn.poll()                                # SYNC (deferred NaN check: log steps only)
                if loss is None and step_fn.nan_run >= NAN_LIMIT:
                    raise TrainError(f"loss was NaN/inf for {NAN_LIMIT} steps in a row (step {st.step}); "
                                     "stopped with the last good weights", 1)
                st.step += 1
                now = clock.counted()
                drift.step_done(now, stage.batch_size / stage.speed if stage.speed > 0 else 0.0)
                ratio = drift.check(now, st.plan, st.step) if st.plan.mode == "time" else None
                due = st.step < st.plan.total_steps and ckpt.due(st.step, st.plan.total_steps, now)
                # torchrun: rank 0's decisions, every rank's events and the global loss (one all-reduce)
                ag = agree(loss=loss, oom=False, term=guard.requested, ratio=ratio, now=now, ckpt=due)
                loss, ratio, now = ag.loss, ag.ratio, ag.now
                meter.step_done(now, stage.batch_size, loss, loader.last_wait_s)
                _log_profile(metrics, busy.step_done(), st.step)
                bar.update(1)
                if st.step % cfg.run.log_every == 0 or st.step == st.plan.total_steps:
                    _log_step(metrics, meter, bar, st, stage, now, p, lr * stage.lr_scale, aug, loss, step_fn, cfg,
                              drop_path_of[stage.kind])
                if ratio is not None:                                    # measured speed is off the plan
                    loader = _replan(st, loader, ratio, now, cfg, env, bar, say)
                    drift.restart(now)
                    save_plan(st.plan)
                    cur_shape = None
                if ag.ckpt:
                    save()                                               # counted
                if ag.stop:
                    raise Terminated()
                if _eval_due(cfg, st):                                   # not counted; a SIGTERM stops it
                    with guard.deferring(False):
                        _validate(evaluator, parts, st, clock, metrics, cfg.run.eval_images, say)
    except TrainError as e:                  # a SIGTERM, a data file gone, NaN losses: what was trained is kept
        evaluator.close()
        raise _stopped(e, st, ckpt, save, guard) from None
    except BaseException:
        evaluator.close()
        raise
    finally:
        bar.close()
        _log_profile(metrics, busy.close(), st.step)
        if loader is not None:
            loader.close()
    # ---- finish --------------------------------------------------------------------------------------
    train_s, train_images = clock.counted() - loop_t0, st.plan.images_until(st.step) - st.plan.images_until(loop_step0)
    try:
        with guard.deferring():
            save()                                        # the final checkpoint: the end of counted time
        counted = clock.counted()
        if guard.requested:
            raise Terminated()
        final = _validate(evaluator, parts, st, clock, metrics, None, say, counted=counted)   # the full split
    except TrainError as e:
        raise _stopped(e, st, ckpt, save, guard) from None
    finally:
        evaluator.close()
    with guard.deferring():                               # nothing left to lose: a SIGTERM lets it finish
        results = _results(cfg, env, st, step_fn, counted, final)
        results.update(dist.throughput(denv, train_images, train_s))
        if grower.on:
            results["growth"] = grower.record()
        if not main:
            return results
        rundir.write_json(run_dir, "results.json", results)
        try:
            plot_curves(metrics.rows, run_dir / "curves.png",
                        title=f"{cfg.run.recipe} {cfg.model.name}: top-1 {final['top1']:.1f}%")
        finally:
            metrics.close()
    return results


# ------------------------------------------------------------------------------------------------------
# build

def _prefixed(log):
    out = log or (lambda s: print(s, file=sys.stderr, flush=True))
    return lambda msg: out(f"[fastvit-train] {msg}")


def _saved_config(config: dict, cfg: TrainConfig, ignored_flags, say) -> TrainConfig:
    """--resume: the run's own saved config wins (its checkpoint's, or the config.json of a run killed
    before its first checkpoint); only the run dir (it may have moved) and the progress bar setting come
    from this call."""
    saved = TrainConfig.from_dict(config)
    saved.run.out, saved.run.progress = cfg.run.out, cfg.run.progress
    if ignored_flags:
        say(f"warning: ignored with --resume (the run's saved config wins): {', '.join(ignored_flags)}")
    return saved


def config_stages(cfg: TrainConfig, env: RunEnv) -> list[Stage]:
    """The stages the config asks for (resolution curriculum × keep schedule × batch rule), no steps yet."""
    sc = cfg.schedule
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
    return build_stages(curriculum=cur, keep_kind=sc.keep_schedule, keep_min=sc.keep_min,
                        keep_full_from=sc.keep_full_from, keep_cycles=sc.keep_cycles, keep_step=sc.keep_step,
                        splits_per_stage=sc.keep_splits, base_batch=sc.batch_size, ref_res=env.final_res,
                        const_tokens=sc.const_tokens, max_batch=sc.max_batch, lr_rule=sc.lr_scaling, patch=patch,
                        tokens=tokens)


def token_schedule(cfg: TrainConfig, curriculum) -> list[tuple[int, float]] | None:
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


def drop_path_rates(cfg: TrainConfig, stages: list[Stage]) -> dict:
    """Drop-path rate per stage kind (res, keep, depth, patch size; a batch change keeps it), from the
    config's own stages (the middle of each one's window), not from re-planned ones whose cut ranges
    would move it: a compiled graph guards on the rate, so one rate per shape."""
    out: dict = {}
    for s in stages:
        out.setdefault(s.kind, S.aug_at(0.5 * (s.f0 + s.f1), drop_path=cfg.schedule.drop_path).drop_path)
    return out


# ------------------------------------------------------------------------------------------------------
# plan

def make_plan(stages, cfg: TrainConfig, env: RunEnv, step_fn: TrainStep, parts: Parts, drop_path_of: dict,
              fallback: BatchFallback, clock: BudgetClock, say) -> tuple[Plan, float]:
    """Compile + probe every shape (counted: the budget pays for it), then steps per stage. --epochs
    needs no speeds: one warm-up step per shape compiles it and fits its batch. Returns (plan, seconds
    spent compiling and probing)."""
    timed = cfg.budget_s is not None
    (stages, speeds), spent = _warm(stages, cfg, step_fn, parts, drop_path_of, fallback, clock, say,
                                    iters=cfg.budget.probe_iters if timed else 0)
    if not timed:
        images = int(round(cfg.budget.epochs * env.ds.count("train")))
        return plan_budget(stages, budget_images=images), spent
    # the first loader stage is built after planning; its start-up is measured on the first steps
    # and handled by the drift check
    reserve = min(120.0, 0.005 * cfg.budget_s)      # the final checkpoint (~0.02 s on the CPU preset)
    try:
        return plan_budget(stages, speeds=speeds, budget_s=cfg.budget_s, setup_s=clock.counted(),
                           reserve_s=reserve), spent
    except BudgetTooSmall as e:
        raise TrainError(str(e), 2) from None


def _rewarm(st: RunState, cfg, step_fn: TrainStep, parts: Parts, drop_path_of: dict, fallback: BatchFallback,
            clock: BudgetClock, say) -> float:
    """--resume: compile the shapes still to come (a fresh process has no graphs). A batch that no
    longer fits (another GPU, other jobs) is halved in the plan from the resume step on."""
    if st.step >= st.plan.total_steps:
        return 0.0
    k0, _ = st.plan.stage_at(st.step)
    todo = st.plan.stages[k0:]
    (fitted, _), spent = _warm(todo, cfg, step_fn, parts, drop_path_of, fallback, clock, say)
    smaller = {f.kind: f.batch_size for s, f in zip(todo, fitted) if f.batch_size < s.batch_size}
    if smaller:
        st.plan = shrink_batches(st.plan, step=st.step, counted_s=clock.counted(), new_batch=smaller,
                                 fallback=fallback)
    return spent


def _warm(stages, cfg, step_fn: TrainStep, parts: Parts, drop_path_of: dict, fallback: BatchFallback,
          clock: BudgetClock, say, iters: int = 0):
    """One synthetic step per distinct shape (its graph compiles at the first call, with the drop-path
    rate it will train at), then `iters` timed ones; batches that do not fit are halved. Weights,
    optimizer and RNG are restored afterwards. Returns ((stages, speeds), seconds spent)."""
    t0 = clock.counted()
    snap = step_fn.snapshot()
    aug = S.aug_at(1.0, mix_prob=(max(cfg.schedule.mix_prob),) * 2, randaug=(max(cfg.schedule.randaug),) * 2)
    n = len({s.shape for s in stages})
    say(f"{'probing' if iters else 'warming up'} {n} shape(s) (compile={'on' if step_fn.env.compile else 'off'})")
    first_step_s = step_fn.compile_s_by_shape   # shape -> seconds of its first (compiling) step

    def run(stage: Stage) -> None:
        parts.drop_path.set(drop_path_of[stage.kind])
        t = clock.now()
        dist.agreed_oom(lambda: step_fn.synthetic(stage, aug), step_fn.env.dist, step_fn.env.device, is_oom)
        first_step_s.setdefault(stage.shape, clock.now() - t)           # synced: its first call compiles

    def halved(old: Stage, new: Stage) -> None:
        say(fallback.describe(old, new))
        step_fn.restore(snap)

    try:
        got = fit_and_probe(stages, run, clock.now, fallback=fallback, is_oom=is_oom, on_halve=halved,
                            warmup=1, iters=iters)
    except OutOfMemory as e:
        raise TrainError(str(e), 1) from None
    finally:
        step_fn.restore(snap)
    spent = clock.counted() - t0
    say(f"compiled/probed {n} shape(s) in {spent:.1f} s (counted); first step per shape (compile + 1 step): "
        + ", ".join(f"res {sh[0]} keep {sh[1]:g} batch {sh[2]} {t:.1f} s" for sh, t in first_step_s.items()))
    return got, spent


# ------------------------------------------------------------------------------------------------------
# loop pieces

def _open_loader(st: RunState, cfg: TrainConfig, env: RunEnv):
    from fastvit.data import CurriculumLoader

    try:
        return CurriculumLoader(env.ds, st.plan.stages, backend=env.backend,
                                device=str(env.device), seed=cfg.run.seed, start_step=st.step,
                                workers=cfg.data.workers, **cfg.data.loader_kwargs(),
                                **({"shard": env.dist.shard} if env.dist.enabled else {}))   # this rank's rows
    except DataError as e:   # missing shard/source tree: one line
        raise TrainError(f"loader ({env.backend}): {e}", 2) from None


def _next_batch(loader, step: int, env: RunEnv):
    try:
        return next(loader)
    except StopIteration:
        raise TrainError(f"the loader stopped at step {step}", 1) from None
    except DataError as e:
        # stages are built in the background: a missing backend, a count mismatch or an ImageFolder
        # error surfaces here, at the first batch of the stage
        raise TrainError(f"train loader ({env.backend}): {e}", 2) from None


def _replan(st: RunState, loader, ratio: float, now: float, cfg, env, bar, say):
    """Re-plan from the seconds really left at the measured speed; the loader takes the new plan in
    place (same res and batch continue; a changed later stage is built in the background)."""
    old = st.plan.total_steps
    st.plan = replan(st.plan, step=st.step, counted_s=now, speed_ratio=ratio)
    say(f"re-plan at step {st.step} ({now:.0f} s): running at {ratio:.2f}× the planned speed; "
        f"{old} → {st.plan.total_steps} steps")
    return _take_plan(st, loader, cfg, env, bar, say)


def _take_plan(st: RunState, loader, cfg, env, bar, say):
    """The loader takes st.plan in place (same res and batch continue; a changed later stage is built in
    the background), or is reopened at the same step."""
    bar.total = st.plan.total_steps
    bar.refresh()
    try:
        loader.replan(st.plan.stages)
        return loader
    except DataError as e:   # a plan whose served history changed
        say(f"re-plan: the loader could not take the new plan in place ({e}); reopening it")
        loader.close()
        return _open_loader(st, cfg, env)


def _probe_more(st: RunState, cfg, step_fn: TrainStep, parts: Parts, drop_path_of: dict, fallback: BatchFallback,
                clock: BudgetClock, say, grower, stages: list[Stage]) -> dict:
    """--growth auto: compile + time more shapes (a boundary's candidates; counted) -> {shape: images/s}."""
    grower.add_rates(drop_path_of, stages)
    (_, speeds), spent = _warm(stages, cfg, step_fn, parts, drop_path_of, fallback, clock, say,
                               iters=max(3, cfg.budget.probe_iters))      # a choice rests on them
    st.compile_s += spent
    return speeds


def _out_of_memory(st: RunState, loader, cfg, env, parts: Parts, fallback: BatchFallback, now: float, say):
    """Out of GPU memory mid-run (on every rank: rank 0's counted seconds `now`): the planner's one
    policy (halve this shape's batch, rescale its LR), then the loader reopens at the same step with
    the new plan."""
    parts.opt.zero_grad(set_to_none=True)
    if env.cuda:
        torch.cuda.empty_cache()
    try:
        st.plan, old, new = halve_in_plan(st.plan, step=st.step, counted_s=now, fallback=fallback)
    except OutOfMemory as e:
        raise TrainError(str(e), 1) from None
    say(fallback.describe(old, new))
    loader.close()
    return _open_loader(st, cfg, env)


def _log_profile(metrics, rec: dict | None, step: int) -> None:
    """A closed profiler window (fastvit.train.profile.BusyWindow) as a metrics row of kind "profile"."""
    if rec is not None:
        metrics.log({**rec, "step": step})


def _log_step(metrics, meter: StepMeter, bar, st: RunState, stage: Stage, now, p, lr, aug, loss, step_fn, cfg,
              drop_path: float):
    rec = {"kind": "train", "step": st.step, "counted_s": round(now, 3), "p": round(p, 5),
           "stage": st.plan.stage_at(st.step - 1)[0], "res": stage.res, "keep": stage.keep, "depth": stage.depth,
           "batch": stage.batch_size, "lr": lr, "loss": loss, "mix_prob": aug.mix_prob,
           "drop_path": drop_path, "nan_skipped": step_fn.nan_total, **meter.record(now, stage)}
    metrics.log(rec)
    budget = (f"budget {now:.0f}/{cfg.budget_s:.0f}s" if cfg.budget_s else
              f"images {st.plan.images_until(st.step)}/{st.plan.budget_images}")
    loss_s = f"{meter.loss_ema:.3f}" if meter.loss_ema is not None else "nan"
    bar.set_postfix_str(f"res {stage.res} keep {stage.keep:g} {rec['images_per_s'] or 0:.0f} img/s "
                        f"loss {loss_s} p {p:.3f} {budget}")


def _eval_due(cfg: TrainConfig, st: RunState) -> bool:
    n = cfg.run.evals
    return bool(n) and st.evals_done < n and st.step < st.plan.total_steps and \
        st.plan.progress_at(st.step) >= (st.evals_done + 1) / (n + 1)


def _validate(evaluator: Evaluator, parts: Parts, st: RunState, clock: BudgetClock, metrics, max_images, say,
              counted=None) -> dict:
    """A validation outside the counted time (periodic: capped; final: max_images None, the full split)."""
    with clock.excluded() as ex:
        r = evaluator(parts.model, parts.ema.module if parts.ema is not None else None, max_images)
    st.val_s += ex["seconds"]
    metrics.log({"kind": "val", "step": st.step, "counted_s": round(counted if counted is not None else
                                                                     clock.counted(), 3),
                 **r, "val_s": round(ex["seconds"], 3)})
    if max_images is not None:
        st.evals_done += 1
        say(f"val @ step {st.step}: top-1 {r['top1']:.2f}% (EMA {r.get('ema_top1', float('nan')):.2f}%)")
    return r


def _progress_bar(cfg: TrainConfig, st: RunState, main: bool = True):
    from tqdm import tqdm

    return tqdm(total=st.plan.total_steps, initial=st.step, disable=not (cfg.run.progress and main), unit="step",
                dynamic_ncols=True, file=sys.stderr)


def _flops(model, stage: Stage) -> float:
    from fastvit.models import train_flops_per_image

    return train_flops_per_image(model, stage.res, stage.keep, patch_size=stage.patch_size)


def _peak(env: RunEnv) -> float | None:
    from fastvit.sysinfo import peak_flops

    return peak_flops(device_name(env)) if env.cuda else None


# ------------------------------------------------------------------------------------------------------
# checkpoints and results

def _save_plan(run_dir: Path, plan: Plan, *, main: bool, grower: Grower) -> None:
    if main:                                    # torchrun: rank 0 writes the run's files
        extra = {"growth": grower.record()} if grower is not None and grower.on else {}
        rundir.write_json(run_dir, "plan.json", {**plan.to_dict(), **extra})


def _save(run_dir: Path, cfg: TrainConfig, parts: Parts, step_fn: TrainStep, st: RunState, clock,
          ckpt: CheckpointSchedule, grower: Grower, denv: dist.DistEnv = dist.SINGLE) -> Path | None:
    """A checkpoint at st.step (atomic), written by rank 0 (every rank holds the same weights). One that
    cannot be written (disk full) ends the run with one line; the previous checkpoint is untouched."""
    if not denv.is_main:
        ckpt.done(st.step, clock.counted())
        return None
    step_fn.poll(loss=False)                    # deferred NaN check: the skipped count current (a SYNC)
    state = {                                   # torch.save copies device tensors to the host: a SYNC
        "config": cfg.to_dict(), "model": parts.model.state_dict(), "opt": parts.opt.state_dict(),
        "ema": parts.ema.module.state_dict() if parts.ema is not None else None,
        "plan": st.plan.to_dict(), "step": st.step, "counted_s": clock.counted(), "rng": rng_state(),
        "evals_done": st.evals_done, "nan_total": step_fn.nan_total, "val_s": st.val_s,
        "compile_s": st.compile_s, "ema_halflife_images": st.ema_halflife_images, "world_size": denv.world,
        "growth": grower.state_dict() if grower.on else None,
    }
    try:
        path = save_checkpoint(run_dir, st.step, state)
    except OSError as e:
        kept = checkpoint_paths(run_dir)
        prev = (f"the previous checkpoint {kept[0].name} is intact; free space and continue with --resume"
                if kept else "no earlier checkpoint: --resume starts from the beginning")
        raise CheckpointFailed(f"cannot write the checkpoint of step {st.step} in {run_dir}: "
                               f"{e.strerror or e}; {prev}", 1) from None
    ckpt.done(st.step, clock.counted())
    return path


def _stopped(e: TrainError, st: RunState, ckpt: CheckpointSchedule, save, guard: TermGuard) -> TrainError:
    """The run stops early (a SIGTERM, a data file gone, NaN losses): what was trained since the last
    checkpoint is written first (a second SIGTERM does not cut it short), and the one line says so."""
    if isinstance(e, CheckpointFailed):
        return e
    if st.step > ckpt.last_step:
        with guard.deferring():
            save()
    kept = f"checkpoint at step {st.step} written" if st.step else "nothing trained yet"
    if isinstance(e, Terminated):
        return Terminated(f"terminated: {kept}; continue with --resume")
    if not st.step:
        return e
    return TrainError(f"{e} ({kept}; continue with --resume)", e.code)


def _restore(ck: dict, parts: Parts, step_fn: TrainStep) -> RunState:
    parts.model.load_state_dict(ck["model"])
    parts.opt.load_state_dict(ck["opt"])
    if parts.ema is not None and ck.get("ema") is not None:
        parts.ema.module.load_state_dict(ck["ema"])
    set_rng_state(ck["rng"])
    step_fn.nan_total = ck.get("nan_total", 0)
    plan = Plan.from_dict(ck["plan"])
    return RunState(plan=plan, step=ck["step"], evals_done=ck.get("evals_done", 0), val_s=ck.get("val_s", 0.0),
                    compile_s=ck.get("compile_s", 0.0),
                    ema_halflife_images=ck.get("ema_halflife_images") or 0.0)


def _results(cfg: TrainConfig, env: RunEnv, st: RunState, step_fn: TrainStep, counted: float, final: dict) -> dict:
    plan = st.plan
    return {
        "top1": final["top1"], "top5": final["top5"],
        "ema_top1": final.get("ema_top1"), "ema_top5": final.get("ema_top5"),
        "eval_res": env.final_res, "val_images": final["val_images"],
        "budget_s": cfg.budget_s, "budget_images": plan.budget_images,
        "counted_s": round(counted, 3), "validation_s": round(st.val_s, 3),
        "steps": st.step, "planned_steps": plan.total_steps, "images_seen": plan.images_until(st.step),
        "replans": len(plan.replans), "nan_skipped": step_fn.nan_total, "compile_s": round(st.compile_s, 3),
        "compile_s_by_shape": [{"res": sh[0], "keep": sh[1], "batch": sh[2], "first_step_s": round(t, 3)}
                               for sh, t in step_fn.compile_s_by_shape.items()],
        "device_name": device_name(env), "backend": env.backend, "recipe": cfg.run.recipe,
        "model": cfg.model.name, "stages": [s.to_dict() for s in plan.stages],
    }
