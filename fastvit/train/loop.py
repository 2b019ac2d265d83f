"""The training run, top to bottom: build → plan → loop → finish (`_run`).

    build   run dir (rundir), data + device + backend (setup.open_env), model, optimizer, EMA, mixup
            (setup.build_parts), one training step (step.TrainStep), growth (growth.Grower) and the
            run's planner (run_planner.RunPlanner) with the stages the config asks for
    plan    the planner compiles + probes every stage shape on synthetic data (counted; its one
            out-of-memory policy), then steps per stage so the run ends on the budget
    loop    the CurriculumLoader says what each step trains on (its Stage: res, keep, batch, LR scale);
            schedules(p) → step → log / re-plan on drift / checkpoint / periodic validation (not counted)
    finish  final checkpoint (the end of the counted time) → full validation, raw and EMA →
            results.json (results.Results), curves.png

The loop only loops: every new plan is *proposed* (the planner on drift or out of memory, growth at a
boundary) and enters through one door, `Live.adopt` (broadcast to every rank, loader hand-over, drift
restart, drop-path refresh at the next step, plan.json).

Progress `p` is the plan's: the share of the training window (budget − set-up − final-checkpoint
reserve) that the plan puts before this step, `plan.progress_at(step)`. The schedules read it and the
log's `p` is it. Re-plans keep it continuous and track the clock, so it stays within a few percent of
counted seconds / budget over the window; with --epochs it is the share of the image budget.

Faults: `train()` holds RUN_DIR/.lock and a SIGTERM handler for the run. A SIGTERM in the loop is seen
after the step in flight, elsewhere (set-up, probe, validation) it stops the run at once; a run stopped
early writes a checkpoint of what it trained first (`Live.stopped`) and exits 143 (SIGTERM) or with its
error's code. Checkpoints are due every min(--ckpt-minutes, 5% of the budget), at least 30 s apart
(`CheckpointSchedule`).

Sync points with the GPU are marked `# SYNC`. The budget (counted seconds) is read from BudgetClock only.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fastvit.data.dataset import DataError
from fastvit.stage import Stage

from . import dist, rundir
from . import schedules as S
from .budget import BudgetClock
from .checkpoint import Checkpoint, CheckpointSchedule, checkpoint_paths, init_parts_from, rng_state, set_rng_state
from .config import TrainConfig
from .errors import CheckpointFailed, TrainError, is_oom
from .evaluate import Evaluator
from .growth import Grower
from .metrics import MetricsWriter, StepMeter, StepTimer, plot_curves
from .planner import DriftMonitor, Plan
from .profile import BusyWindow
from .results import Results
from .run_planner import Proposal, RunPlanner
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


@dataclass(frozen=True)
class Invocation:
    """How train() was called, beyond the config: resume or overwrite, the flags a resume ignores, a
    fake clock (tests) and the log line."""
    resume: bool
    overwrite: bool
    ignored_flags: tuple
    clock: Callable | None
    say: Callable


@dataclass
class Run:
    """The long-lived objects of one run, built once (`_build`) and shared by the loop's pieces."""
    cfg: TrainConfig
    env: RunEnv
    parts: Parts
    step_fn: TrainStep
    clock: BudgetClock
    grower: Grower
    planner: RunPlanner
    say: Callable
    st: RunState | None = None
    model_auto: dict | None = None     # --model auto: the choice (auto.Choice.to_dict), kept across a resume

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.out)

    @property
    def denv(self) -> dist.DistEnv:
        return self.env.dist

    @property
    def main(self) -> bool:
        return self.denv.is_main                      # rank 0 owns the clock, the plan and the files

    def save_plan(self) -> None:
        """plan.json (rank 0), with the growth record of a --growth run."""
        if self.main:
            extra = {"growth": self.grower.record()} if self.grower.on else {}
            if self.model_auto:
                extra["model_auto"] = self.model_auto
            rundir.write_json(self.run_dir, "plan.json", {**self.st.plan.to_dict(), **extra})

    def probe_more(self, stages: list[Stage]) -> dict:
        """--growth auto: compile + time more shapes (a boundary's candidates; counted) -> {shape: images/s}."""
        (_, speeds), spent = self.planner.probe(stages, iters=max(3, self.cfg.budget.probe_iters))
        self.st.compile_s += spent                    # a choice rests on them
        return speeds


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, log=None, clock=None,
          ignored_flags=()) -> dict:
    """One run in cfg.run.out, holding the run dir's lock and the SIGTERM handler (both released when it
    returns): build → plan → loop → finish (`_run`)."""
    guard = TermGuard()
    denv = dist.DistEnv.from_environ()                  # under torchrun: this rank; else world 1
    with dist.run_lock(denv, Path(cfg.run.out)) as lock:
        try:
            guard.install()
            how = Invocation(resume, overwrite, tuple(ignored_flags), clock, dist.main_only(denv, _prefixed(log)))
            return _run(cfg, how, lock, guard, denv)
        except Terminated as e:
            if not e.bare:
                raise
            raise Terminated("terminated before training (set-up, compile or probe): nothing new trained; "
                             "continue with --resume") from None
        finally:
            guard.restore()
            dist.destroy(denv)


def _run(cfg: TrainConfig, how: Invocation, lock, guard: TermGuard, denv: dist.DistEnv) -> dict:
    # ---- build ---------------------------------------------------------------------------------------
    run, ck, stages = _build(cfg, how, lock, denv)
    # ---- plan ----------------------------------------------------------------------------------------
    _plan(run, ck, stages)
    # ---- loop ----------------------------------------------------------------------------------------
    cfg, clock, st, step_fn = run.cfg, run.clock, run.st, run.step_fn
    live = Live(run, resumed=ck is not None)
    loop_t0, loop_step0 = clock.counted(), st.step
    try:
        with guard.deferring():                                          # a SIGTERM: after the step in flight
            while st.step < st.plan.total_steps:
                images, labels, stage = live.next_batch()                # what this step trains on
                # images (B,3,r,r) uint8, labels (B,) int64, B = stage.batch_size, r = stage.res
                proposal = run.grower.before_step(st.plan, st.step, stage, clock)   # a growth (counted)
                if proposal is not None:
                    live.adopt(proposal, clock.counted())
                    stage = st.plan.stages[st.plan.stage_at(st.step)[0]]  # its depth may have changed
                if stage.shape != live.cur_shape:                        # a stage change: its drop-path rate
                    live.new_stage(stage)
                p = st.plan.progress_at(st.step)                         # the one progress (see above)
                lr = S.lr_at(p, base_lr=cfg.optim.lr, warmup=cfg.optim.warmup, decay=cfg.optim.lr_decay)
                aug = S.aug_at(p, mix_prob=cfg.augment.mix_prob, randaug=cfg.augment.randaug,
                               drop_path=cfg.augment.drop_path)
                live.meter.timer.start()
                try:
                    loss = step_fn(images.to(run.env.device, non_blocking=True),
                                   labels.to(run.env.device, non_blocking=True), stage, lr=lr * stage.lr_scale,
                                   aug=aug, images_seen=st.plan.images_until(st.step))
                except Exception as e:  # noqa: BLE001 - only out-of-memory is handled
                    live.meter.timer.cancel()
                    if not is_oom(e):
                        raise
                    live.out_of_memory()                                 # halve the batch, same step again
                    continue
                live.meter.timer.stop()                                  # the EMA update is inside the span
                if step_fn.deferred and ((st.step + 1) % cfg.run.log_every == 0 or st.step + 1 == st.plan.total_steps):
                    loss = step_fn.poll()                                # SYNC (deferred NaN check: log steps only)
                if loss is None and step_fn.nan_run >= NAN_LIMIT:
                    raise TrainError(f"loss was NaN/inf for {NAN_LIMIT} steps in a row (step {st.step}); "
                                     "stopped with the last good weights", 1)
                st.step += 1
                ag = live.step_done(stage, loss, guard.requested)        # torchrun: one all-reduce
                if st.step % cfg.run.log_every == 0 or st.step == st.plan.total_steps:
                    live.log_step(stage, ag.now, p, lr * stage.lr_scale, aug, ag.loss)
                if ag.ratio is not None:                                 # measured speed is off the plan
                    live.adopt(run.planner.on_drift(st.plan, st.step, ag.ratio, ag.now), ag.now)
                if ag.ckpt:
                    live.save()                                          # counted
                if ag.stop:
                    raise Terminated()
                if _eval_due(cfg, st):                                   # not counted; a SIGTERM stops it
                    with guard.deferring(False):
                        live.validate(cfg.run.eval_images)
    except TrainError as e:                  # a SIGTERM, a data file gone, NaN losses: what was trained is kept
        live.evaluator.close()
        raise live.stopped(e, guard) from None
    except BaseException:
        live.evaluator.close()
        raise
    finally:
        live.close_loop()
    # ---- finish --------------------------------------------------------------------------------------
    train_s, train_images = clock.counted() - loop_t0, st.plan.images_until(st.step) - st.plan.images_until(loop_step0)
    try:
        with guard.deferring():
            live.save()                                   # the final checkpoint: the end of counted time
        counted = clock.counted()
        if guard.requested:
            raise Terminated()
        final = live.validate(None, counted=counted)      # the full split
    except TrainError as e:
        raise live.stopped(e, guard) from None
    finally:
        live.evaluator.close()
    with guard.deferring():                               # nothing left to lose: a SIGTERM lets it finish
        results = Results.of_run(cfg, run.env, st, step_fn, counted, final).updated(
            **dist.throughput(denv, train_images, train_s),
            **({"growth": run.grower.record()} if run.grower.on else {}),
            **({"model_auto": run.model_auto, "predicted_top1": _predicted(run.model_auto)} if run.model_auto else {}))
        if not run.main:
            return results.to_dict()
        results.write(run.run_dir)
        try:
            plot_curves(live.metrics.rows, run.run_dir / "curves.png",
                        title=f"{cfg.run.recipe} {cfg.model.name}: top-1 {final['top1']:.1f}%")
        finally:
            live.metrics.close()
    return results.to_dict()


# ------------------------------------------------------------------------------------------------------
# build

def _prefixed(log):
    out = log or (lambda s: print(s, file=sys.stderr, flush=True))
    return lambda msg: out(f"[fastvit-train] {msg}")


def _build(cfg: TrainConfig, how: Invocation, lock, denv: dist.DistEnv) -> tuple[Run, Checkpoint | None, list[Stage]]:
    """Everything the run is made of, checked before any compute: (run, the checkpoint it resumes or
    None, the stages the config asks for)."""
    run_dir, say = Path(cfg.run.out), how.say
    ck = rundir.open_for_resume(run_dir, say) if how.resume else None
    saved = ck.config if ck else rundir.saved_config(run_dir) if how.resume else None
    if saved:                                             # the run's own config wins (a killed run's too)
        cfg = _saved_config(saved, cfg, how.ignored_flags, say)
    if not ck:
        rundir.no_checkpoint(run_dir, how.resume, cfg.has_budget, say)
    prior = [] if ck else rundir.previous_run(run_dir, how.overwrite, restart=how.resume)
    clock = BudgetClock(cfg.budget_s, counted_s=ck.counted_s if ck else 0.0, **({"clock": how.clock} if how.clock else {}))
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
    model_auto = ck.model_auto if ck else None
    if cfg.model.name == "auto":                          # the shape for this budget here (counted probes)
        cfg, model_auto = _auto_model(cfg, env, clock, say)
    parts = build_parts(cfg, env, env.ds.num_classes)
    if cfg.run.init_from and not ck:                      # a warmup-stable-decay branch (or trunk segment)
        init_parts_from(cfg.run.init_from, parts, say)
    step_fn = TrainStep(parts, cfg, env)
    grower = Grower(cfg, parts, step_fn, env, say)       # --growth: the depth per stage (growth.py)
    run = Run(cfg=cfg, env=env, parts=parts, step_fn=step_fn, clock=clock, grower=grower,
              planner=RunPlanner(cfg, env, step_fn, clock, say), say=say, model_auto=model_auto)
    stages = run.planner.stages(grower.assign_depths)
    if run.main:
        rundir.start(run_dir, prior, say, lock)           # every setting checked: a previous run may go now
    return run, ck, stages


def _auto_model(cfg: TrainConfig, env: RunEnv, clock: BudgetClock, say) -> tuple[TrainConfig, dict]:
    """--model auto: the candidates probed (counted, at most --auto-probe-share of the budget; cached),
    the law's argmax, its lines printed; the config at the chosen shape and the choice's record."""
    from . import auto

    choice = auto.choose_for_run(cfg, env, clock, say)
    return auto.apply(cfg, choice), choice.to_dict()


def _saved_config(config: dict, cfg: TrainConfig, ignored_flags, say) -> TrainConfig:
    """--resume: the run's own saved config wins (its checkpoint's, or the config.json of a run killed
    before its first checkpoint); only the run dir (it may have moved) and the progress bar setting come
    from this call."""
    saved = TrainConfig.from_dict(config)
    saved.run.out, saved.run.progress = cfg.run.out, cfg.run.progress
    if ignored_flags:
        say(f"warning: ignored with --resume (the run's saved config wins): {', '.join(ignored_flags)}")
    return saved


# ------------------------------------------------------------------------------------------------------
# plan

def _plan(run: Run, ck: Checkpoint | None, stages: list[Stage]) -> None:
    """run.st: a new run's first plan (compiled, probed, counted), or the checkpoint's state with the
    shapes still to come compiled; rank 0's plan on every rank. Then growth, the EMA's time constant and
    the plan's two lines."""
    cfg, env, denv, say = run.cfg, run.env, run.denv, run.say
    if ck:
        st = _restore(ck, run.parts, run.step_fn)
        plan, spent = run.planner.resume(st.plan, st.step)
        st.plan, st.compile_s = dist.broadcast_object(plan, denv, env.device), st.compile_s + spent
    else:
        plan, spent = dist.broadcast_object(run.planner.first(stages), denv, env.device)
        st = RunState(plan=plan, compile_s=spent)
        if run.main:
            rundir.write_json(run.run_dir, "config.json", cfg.to_dict())
    run.st = st
    if run.grower.on:                                     # the model at the run's depth; auto's probe
        run.grower.load_state_dict(ck.growth if ck else None)
        run.grower.probe = run.probe_more
        run.grower.begin(st.plan, st.step)
    # the EMA's half-life in images: a share of the first plan's images, kept in every checkpoint (a
    # checkpoint of the first release has none: then the share of its plan's)
    st.ema_halflife_images = st.ema_halflife_images or \
        cfg.optim.ema_halflife * st.plan.images_until(st.plan.total_steps)
    run.step_fn.ema_rate = EmaRate(st.ema_halflife_images)
    dist.seed_rank(denv, cfg.run.seed, st.step)           # torchrun: each rank its own patch draws, mixup
    for s in st.plan.stages:                              # a run resumed on another number of processes
        dist.check_batch(denv, s.batch_size, f"the planned batch {s.batch_size} (res {s.res})")
    run.save_plan()
    say(f"device {env.device} ({device_name(env)}), backend {env.backend}, recipe {cfg.run.recipe}, "
        f"model {cfg.model.name}, final res {env.final_res}" +
        (f", {denv.world} processes (global batch {cfg.schedule.batch_size})" if denv.enabled else ""))
    say("plan: " + ", ".join(f"res {s.res} keep {s.keep:g}{f' depth {s.depth}' if s.depth else ''} batch "
                             f"{s.batch_size} × {s.steps}" for s in st.plan.stages)
        + f" = {st.plan.total_steps} steps")
    from .run_planner import data_bound_lines

    for line in data_bound_lines(st.plan, env, cfg):     # stages this machine's loader cannot feed
        say(line)


def _restore(ck: Checkpoint, parts: Parts, step_fn: TrainStep) -> RunState:
    ck.load_weights(parts)
    set_rng_state(ck.rng)
    step_fn.nan_total = ck.nan_total
    return RunState(plan=Plan.from_dict(ck.plan), step=ck.step, evals_done=ck.evals_done, val_s=ck.val_s,
                    compile_s=ck.compile_s, ema_halflife_images=ck.ema_halflife_images)


# ------------------------------------------------------------------------------------------------------
# loop

class Live:
    """The loop's moving parts: loader, drift monitor, progress bar, step meter, checkpoint schedule,
    metrics, evaluator, profiler window and the ranks' per-step agreement. `adopt` is the one way a new
    plan enters the loop."""

    def __init__(self, run: Run, resumed: bool):
        cfg, env, st, clock = run.cfg, run.env, run.st, run.clock
        self.run = run
        self.metrics = MetricsWriter(run.run_dir, resume_step=st.step if resumed else None,
                                     tensorboard=cfg.run.tensorboard) if run.main else dist.NoMetrics()
        self.evaluator = Evaluator(env, batch_size=max(16, min(256, cfg.schedule.batch_size)),
                                   workers=cfg.data.workers, loader_kwargs=cfg.data.loader_kwargs())
        self.meter = StepMeter(StepTimer(env.cuda, clock.now), window=max(20, 2 * cfg.run.log_every),
                               flops_per_image=lambda s: _flops(run.parts.model, s), peak_flops=_peak(env),
                               now=clock.counted())
        self.drift = DriftMonitor(cfg.budget_s or 1.0, tol=cfg.budget.replan_tol)
        self.bar = _progress_bar(cfg, st, run.main)
        self.loader = _open_loader(st, cfg, env) if st.step < st.plan.total_steps else None
        self.ckpt = CheckpointSchedule(minutes=cfg.run.ckpt_minutes, every_steps=cfg.run.ckpt_every_steps,
                                       budget_s=cfg.budget_s, step=st.step, now=clock.counted())
        self.agree = dist.StepAgreement(run.denv, env.device)   # world 1: no collective, the values as they are
        self.busy = BusyWindow(cfg.run.profile_steps, skip=min(20, max(1, cfg.run.profile_steps // 4)), cuda=env.cuda)
        self.cur_shape = None                                   # the shape whose drop-path rate is set

    # -- plans ----------------------------------------------------------------------------------------
    def adopt(self, proposal: Proposal, now: float) -> None:
        """The one door for a new plan: rank 0's on every rank, the loader takes it (in place, or
        reopened at the same step), the drift measurement restarts, the next step sets its stage's
        drop-path rate, plan.json is written."""
        run = self.run
        run.st.plan = dist.broadcast_object(proposal.plan, run.denv, run.env.device)
        if proposal.why:
            run.say(proposal.why)
        self.bar.total = run.st.plan.total_steps
        self.bar.refresh()
        if proposal.reopen:
            self.loader.close()
            self.loader = _open_loader(run.st, run.cfg, run.env)
        else:
            self.loader = self._take_plan()
        self.drift.restart(now)
        self.cur_shape = None
        run.save_plan()

    def _take_plan(self):
        """The loader takes the plan in place (same res and batch continue; a changed later stage is
        built in the background), or is reopened at the same step."""
        run = self.run
        try:
            self.loader.replan(run.st.plan.stages)
            return self.loader
        except DataError as e:   # a plan whose served history changed
            run.say(f"re-plan: the loader could not take the new plan in place ({e}); reopening it")
            self.loader.close()
            return _open_loader(run.st, run.cfg, run.env)

    def out_of_memory(self) -> None:
        """Out of GPU memory in a step (agreed by every rank): the planner's one policy, adopted."""
        run = self.run
        now = self.agree(loss=None, oom=True, term=False, ratio=None, now=run.clock.counted(), ckpt=False).now
        run.parts.opt.zero_grad(set_to_none=True)
        if run.env.cuda:
            torch.cuda.empty_cache()
        self.adopt(run.planner.on_oom(run.st.plan, run.st.step, now), now)

    # -- steps ----------------------------------------------------------------------------------------
    def next_batch(self):
        try:
            return next(self.loader)
        except StopIteration:
            raise TrainError(f"the loader stopped at step {self.run.st.step}", 1) from None
        except DataError as e:
            # stages are built in the background: a missing backend, a count mismatch or an ImageFolder
            # error surfaces here, at the first batch of the stage
            raise TrainError(f"train loader ({self.run.env.backend}): {e}", 2) from None

    def new_stage(self, stage: Stage) -> None:
        self.cur_shape = stage.shape
        self.run.parts.drop_path.set(self.run.planner.drop_path(stage))
        self.meter.new_stage()
        self._log_profile(self.busy.new_stage(stage))           # --profile-steps: GPU-busy window

    def step_done(self, stage: Stage, loss, term: bool):
        """After a step: the drift check, whether a checkpoint is due, and the ranks' agreement on them
        (rank 0's decisions, every rank's events and the global loss); the meter and the bar."""
        run, st = self.run, self.run.st
        now = run.clock.counted()
        self.drift.step_done(now, stage.batch_size / stage.speed if stage.speed > 0 else 0.0)
        ratio = self.drift.check(now, st.plan, st.step) if st.plan.mode == "time" else None
        due = st.step < st.plan.total_steps and self.ckpt.due(st.step, st.plan.total_steps, now)
        ag = self.agree(loss=loss, oom=False, term=term, ratio=ratio, now=now, ckpt=due)
        self.meter.step_done(ag.now, stage.batch_size, ag.loss, self.loader.last_wait_s)
        self._log_profile(self.busy.step_done())
        self.bar.update(1)
        return ag

    def log_step(self, stage: Stage, now: float, p: float, lr: float, aug, loss) -> None:
        run, st = self.run, self.run.st
        rec = {"kind": "train", "step": st.step, "counted_s": round(now, 3), "p": round(p, 5),
               "stage": st.plan.stage_at(st.step - 1)[0], "res": stage.res, "keep": stage.keep, "depth": stage.depth,
               "batch": stage.batch_size, "lr": lr, "loss": loss, "mix_prob": aug.mix_prob,
               "drop_path": run.planner.drop_path(stage), "nan_skipped": run.step_fn.nan_total,
               **self.meter.record(now, stage)}
        self.metrics.log(rec)
        budget = (f"budget {now:.0f}/{run.cfg.budget_s:.0f}s" if run.cfg.budget_s else
                  f"images {st.plan.images_until(st.step)}/{st.plan.budget_images}")
        loss_s = f"{self.meter.loss_ema:.3f}" if self.meter.loss_ema is not None else "nan"
        self.bar.set_postfix_str(f"res {stage.res} keep {stage.keep:g} {rec['images_per_s'] or 0:.0f} img/s "
                                 f"loss {loss_s} p {p:.3f} {budget}")

    def _log_profile(self, rec: dict | None) -> None:
        """A closed profiler window (fastvit.train.profile.BusyWindow) as a metrics row of kind "profile"."""
        if rec is not None:
            self.metrics.log({**rec, "step": self.run.st.step})

    def close_loop(self) -> None:
        self.bar.close()
        self._log_profile(self.busy.close())
        if self.loader is not None:
            self.loader.close()

    # -- validation and checkpoints -------------------------------------------------------------------
    def validate(self, max_images, counted=None) -> dict:
        """A validation outside the counted time (periodic: capped; final: max_images None, the full split)."""
        run, st = self.run, self.run.st
        with run.clock.excluded() as ex:
            r = self.evaluator(run.parts.model, run.parts.ema.module if run.parts.ema is not None else None, max_images)
        st.val_s += ex["seconds"]
        self.metrics.log({"kind": "val", "step": st.step, "counted_s": round(counted if counted is not None else
                                                                             run.clock.counted(), 3),
                          **r, "val_s": round(ex["seconds"], 3)})
        if max_images is not None:
            st.evals_done += 1
            run.say(f"val @ step {st.step}: top-1 {r['top1']:.2f}% (EMA {r.get('ema_top1', float('nan')):.2f}%)")
        return r

    def save(self) -> Path | None:
        """A checkpoint at the current step (atomic), written by rank 0 (every rank holds the same
        weights). One that cannot be written (disk full) ends the run with one line; the previous
        checkpoint is untouched."""
        run, st, clock = self.run, self.run.st, self.run.clock
        if not run.main:
            self.ckpt.done(st.step, clock.counted())
            return None
        run.step_fn.poll(loss=False)                # deferred NaN check: the skipped count current (a SYNC)
        parts = run.parts                           # torch.save copies device tensors to the host: a SYNC
        ck = Checkpoint(config=run.cfg.to_dict(), model=parts.model.state_dict(), opt=parts.opt.state_dict(),
                        ema=parts.ema.module.state_dict() if parts.ema is not None else None,
                        plan=st.plan.to_dict(), step=st.step, counted_s=clock.counted(), rng=rng_state(),
                        evals_done=st.evals_done, nan_total=run.step_fn.nan_total, val_s=st.val_s,
                        compile_s=st.compile_s, ema_halflife_images=st.ema_halflife_images,
                        world_size=run.denv.world, growth=run.grower.state_dict() if run.grower.on else None,
                        model_auto=run.model_auto)
        try:
            path = ck.write(run.run_dir)
        except OSError as e:
            kept = checkpoint_paths(run.run_dir)
            prev = (f"the previous checkpoint {kept[0].name} is intact; free space and continue with --resume"
                    if kept else "no earlier checkpoint: --resume starts from the beginning")
            raise CheckpointFailed(f"cannot write the checkpoint of step {st.step} in {run.run_dir}: "
                                   f"{e.strerror or e}; {prev}", 1) from None
        self.ckpt.done(st.step, clock.counted())
        return path

    def stopped(self, e: TrainError, guard: TermGuard) -> TrainError:
        """The run stops early (a SIGTERM, a data file gone, NaN losses): what was trained since the last
        checkpoint is written first (a second SIGTERM does not cut it short), and the one line says so."""
        st = self.run.st
        if isinstance(e, CheckpointFailed):
            return e
        if st.step > self.ckpt.last_step:
            with guard.deferring():
                self.save()
        kept = f"checkpoint at step {st.step} written" if st.step else "nothing trained yet"
        if isinstance(e, Terminated):
            return Terminated(f"terminated: {kept}; continue with --resume")
        if not st.step:
            return e
        return TrainError(f"{e} ({kept}; continue with --resume)", e.code)


def _open_loader(st: RunState, cfg: TrainConfig, env: RunEnv):
    from fastvit.data import CurriculumLoader

    try:
        return CurriculumLoader(env.source, st.plan.stages, seed=cfg.run.seed, start_step=st.step,
                                workers=cfg.data.workers, **cfg.data.loader_kwargs(),
                                **({"shard": env.dist.shard} if env.dist.enabled else {}))   # this rank's rows
    except DataError as e:   # missing shard/source tree: one line
        raise TrainError(f"loader ({env.backend}): {e}", 2) from None


def _eval_due(cfg: TrainConfig, st: RunState) -> bool:
    n = cfg.run.evals
    return bool(n) and st.evals_done < n and st.step < st.plan.total_steps and \
        st.plan.progress_at(st.step) >= (st.evals_done + 1) / (n + 1)


def _progress_bar(cfg: TrainConfig, st: RunState, main: bool = True):
    from tqdm import tqdm

    return tqdm(total=st.plan.total_steps, initial=st.step, disable=not (cfg.run.progress and main), unit="step",
                dynamic_ncols=True, file=sys.stderr)


def _flops(model, stage: Stage) -> float:
    from fastvit.models import train_flops_per_image

    return train_flops_per_image(model, stage.res, stage.keep, patch_size=stage.patch_size, depth=stage.depth)


def _predicted(model_auto: dict) -> dict:
    """results.json's predicted_top1 beside the measured top1: the law's forecast of the pick, with its
    interval (the law was told the images the plan gave; the run may have seen a few % more or less)."""
    p = model_auto["pick"]
    return {"top1": p["top1"], "interval": p["interval"], "images": p["images"], "extrapolates": p["extrapolates"],
            **{k: p[k] for k in ("images_shallow", "images_effective") if k in p}}


def _peak(env: RunEnv) -> float | None:
    from fastvit.sysinfo import peak_flops

    return peak_flops(device_name(env)) if env.cuda else None
