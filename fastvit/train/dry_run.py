"""`fastvit-train --dry-run`: the plan of a run, printed, without training and without writing anything.

    fastvit-train --data OUT --hours 24 --dry-run                      # this machine: probes real speeds
    fastvit-train --data OUT --hours 24 --dry-run --assume-speed FILE  # a machine you are not on
    fastvit-train --data OUT --hours 6 --model auto --dry-run ...      # and the shape auto would pick

It reads the data, resolves device and backend, takes the stages the config asks for, gets a training
speed for each stage shape -- probed here with the planner's own probe (compile + timed synthetic
steps), or assumed from FILE (fastvit.train.speeds) -- and plans the budget with the same functions a
run uses (run_planner.config_stages, planner.plan_budget). It prints, per stage: resolution, keep rate,
batch, steps, images and epochs, the step rate, the loader's expected feed rate on this machine's (or
the assumed machine's) cores against it, and the GPU memory the stage's shard needs to be resident;
then the totals. Nothing is written: no run dir, no lock, no checkpoint (the probe cache of --model
auto is the one file it may update, in the user's cache dir).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from fastvit.stage import Stage

from .errors import TrainError

ASSUMED_COMPILE_S = 60.0     # per stage shape, when FILE gives none: the 30-70 s cold ViT-S compiles of issue 23


@dataclass
class DryEnv:
    """What planning reads of a run's environment (setup.RunEnv's fields), for a machine you are not on."""
    ds: object
    device: torch.device
    backend: str
    final_res: int
    amp: bool = True
    compile: bool = True
    backend_why: str = ""
    dist: object = None

    def __post_init__(self):
        if self.dist is None:
            from .dist import SINGLE

            self.dist = SINGLE

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class DryPlan:
    plan: object                           # planner.Plan
    rows: list[dict] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    model_auto: dict | None = None

    def to_dict(self) -> dict:
        return {"plan": self.plan.to_dict(), "rows": self.rows, "model_auto": self.model_auto}


def dry_run(cfg, assume: str | None = None, say=print) -> DryPlan:
    """The run's plan for cfg's data, budget and device (or the machine FILE describes); printed with
    `say`, returned."""
    from .speeds import read_assumed

    if not cfg.has_budget:
        raise TrainError("give a budget: --hours H, --minutes M or --epochs N", 2)
    assumed = read_assumed(assume) if assume else None
    env = _assumed_env(cfg) if assumed else _this_env(cfg)
    out = DryPlan(plan=None)
    n_train = env.ds.count("train")
    say("dry run: nothing is trained and nothing is written" + (f" ({cfg.run.out} stays as it is)" if cfg.run.out else ""))
    say(f"data: {cfg.data.root}: {n_train:,} train / {env.ds.count('val'):,} val images, {env.ds.num_classes} "
        f"classes, resolutions {','.join(map(str, env.ds.resolutions))}")
    say(f"device: {assumed.describe() if assumed else _device_line(env)}")
    say(f"backend: {env.backend}" + (f" ({env.backend_why})" if env.backend_why else ""))
    if cfg.model.name == "auto":
        cfg, out.model_auto = _choose(cfg, env, assumed, say)
    from .run_planner import config_stages

    stages = config_stages(cfg, env)
    if assumed:
        speeds = {s.shape: _assumed_img_s(cfg, assumed, s, env) for s in stages}
        setup_s = float(getattr(assumed, "compile_s_per_shape", None) or ASSUMED_COMPILE_S) * len({s.shape for s in stages})
        setup_how = f"assumed {setup_s / len({s.shape for s in stages}):.0f} s compile per shape"
    else:
        stages, speeds, setup_s = _probe_here(cfg, env, stages, say)
        setup_how = "measured here: compile + probe"
    out.plan = _plan(cfg, env, stages, speeds, setup_s)
    say(f"budget: {_budget_text(cfg)}; set-up {setup_s:.0f} s ({setup_how}), reserve {out.plan.reserve_s:.0f} s")
    cores = assumed.cores if assumed and assumed.cores else os.cpu_count()
    out.rows = stage_rows(out.plan, n_train, env.backend, cores, _gpu_bytes(cfg, env, assumed))
    for line in format_rows(out.rows):
        say(line)
    total = out.plan.images_until(out.plan.total_steps)
    say(f"total: {out.plan.total_steps:,} steps, {total:,} images = {total / max(1, n_train):.1f} epochs"
        + (" (assumed speeds: a plan for that machine, not a measurement)" if assumed else ""))
    return out


# ------------------------------------------------------------------------------------------------------

def _this_env(cfg):
    from .setup import open_env

    return open_env(cfg)


def _assumed_env(cfg) -> DryEnv:
    """The GPU machine FILE describes: its device is cuda (not resolved here), the backend the one asked
    for or what `auto` takes there without DALI (gpu_resident), compile and bf16 on."""
    from fastvit.data import open_dataset
    from fastvit.data.dataset import DataError

    from .rules import final_resolution

    if not cfg.data.root:
        raise TrainError("--data is required: a directory written by fastvit-prep", 2)
    try:
        ds = open_dataset(cfg.data.root)
    except (DataError, OSError) as e:
        raise TrainError(f"--data {cfg.data.root}: {e}", 2) from None
    backend = cfg.data.backend if cfg.data.backend not in (None, "auto") else "gpu_resident"
    why = "" if cfg.data.backend not in (None, "auto") else \
        "assumed: backend auto on a GPU machine without DALI (DALI installed there: dali)"
    return DryEnv(ds=ds, device=torch.device("cuda"), backend=backend, final_res=final_resolution(cfg, ds.resolutions),
                  backend_why=why)


def _device_line(env) -> str:
    from .setup import device_name

    return f"{device_name(env)} (here), compile {'on' if env.compile else 'off'}, bf16 {'on' if env.amp else 'off'}"


def _gpu_bytes(cfg, env, assumed) -> float | None:
    """The GPU memory resident shards may take: --gpu-mem-share of the (assumed) GPU's memory."""
    share = cfg.data.loader.gpu_mem_share
    if assumed is not None:
        return share * assumed.memory_gb * 1e9 if assumed.memory_gb else None
    if env.cuda:
        return share * torch.cuda.get_device_properties(env.device).total_memory
    return None


def _budget_text(cfg) -> str:
    if cfg.budget_s is not None:
        return f"{cfg.budget_s / 3600:g} h = {cfg.budget_s:,.0f} s counted"
    return f"{cfg.budget.epochs:g} epochs of images"


def _assumed_img_s(cfg, assumed, stage: Stage, env) -> float:
    from fastvit.models import model_config
    from fastvit.models.vit import train_flops

    vcfg = model_config(cfg.model.name, **cfg.model.overrides())
    if stage.patch_size:
        from dataclasses import replace

        vcfg = replace(vcfg, patch_size=stage.patch_size)
    if stage.depth:
        from dataclasses import replace

        vcfg = replace(vcfg, depth=stage.depth)
    return assumed.img_s(train_flops(vcfg, stage.res, stage.keep, sparse_locality=env.cuda and vcfg.sparse_locality),
                         stage.res, stage.keep)


def _probe_here(cfg, env, stages, say):
    """Speeds measured on this machine by the planner's probe (nothing is trained: synthetic steps at
    LR 0, weights restored)."""
    from .budget import BudgetClock
    from .run_planner import RunPlanner
    from .setup import build_parts
    from .step import TrainStep

    clock = BudgetClock(cfg.budget_s)
    parts = build_parts(cfg, env, env.ds.num_classes)
    step_fn = TrainStep(parts, cfg.schedule, env)
    planner = RunPlanner(cfg, env, step_fn, clock, say)
    planner.stages()
    (fitted, speeds), spent = planner.probe(stages, iters=max(1, cfg.budget.probe_iters))
    return fitted, speeds, spent


def _plan(cfg, env, stages, speeds, setup_s: float):
    from .planner import BudgetTooSmall, plan_budget
    from .rules import reserve_s

    try:
        if cfg.budget_s is None:
            return plan_budget(stages, budget_images=int(round(cfg.budget.epochs * env.ds.count("train"))))
        return plan_budget(stages, speeds=speeds, budget_s=cfg.budget_s, setup_s=setup_s,
                           reserve_s=reserve_s(cfg.budget_s))
    except BudgetTooSmall as e:
        raise TrainError(str(e), 2) from None


def _choose(cfg, env, assumed, say):
    from . import auto
    from .budget import BudgetClock

    law, warnings = auto.law_for(cfg, env, cfg.budget.scaling)
    cache = None if assumed else auto.ProbeCache(auto.machine_key(env))
    measure = None if assumed else auto.measure_with(env, BudgetClock(cfg.budget_s), lambda m: None)
    choice = auto.choose_model(cfg, env, measure, law, cache=cache, assumed=assumed)
    choice.warnings += warnings
    for line in choice.lines():
        say(line)
    for r in choice.rows:
        top = f"top-1 {r['top1']:5.1f}% [{r['interval'][0]:.1f}, {r['interval'][1]:.1f}]" if r["top1"] is not None \
            else "sees no image"
        say(f"  {r['shape']:>14}  {r['params'] / 1e6:7.2f} M  {r['images']:>14,} images  {top}  speed: {r['speed_from']}"
            + (f"  (extrapolating: {r['extrapolates']})" if r["extrapolates"] else ""))
    return auto.apply(cfg, choice), choice.to_dict()


# ------------------------------------------------------------------------------------------------------
# the table

def stage_rows(plan, n_train: int, backend: str, cores: int, gpu_bytes: float | None) -> list[dict]:
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


def data_bound_lines(plan, env, cfg) -> list[str]:
    """The run's own plan (fastvit-train): one line per stage the loader cannot feed on this machine's
    cores, by the per-core decode table; none when every stage is fed (or nothing can be said)."""
    if plan.mode != "time":
        return []
    cores = cfg.data.workers + 1 if cfg.data.workers else len(os.sched_getaffinity(0))   # the loader's + the trainer's
    rows = stage_rows(plan, env.ds.count("train"), env.backend, cores, _gpu_bytes(cfg, env, None))
    return [f"stage {r['stage']} (res {r['res']}): {r['note']}" for r in rows if r["data_bound"]]


def format_rows(rows: list[dict]) -> list[str]:
    head = (f"{'stage':>5} {'res':>4} {'keep':>5} {'batch':>5} {'steps':>9} {'images':>13} {'epochs':>7} "
            f"{'step img/s':>10} {'feed img/s':>10}  {'resident':>8}  verdict")
    out = [head]
    for r in rows:
        feed = f"{r['feed_img_s']:,.0f}" if r["feed_img_s"] else "-"
        step = f"{r['step_img_s']:,.0f}" if r["step_img_s"] else "-"
        verdict = r.get("note", "")
        out.append(f"{r['stage']:>5} {r['res']:>4} {r['keep']:>5g} {r['batch']:>5} {r['steps']:>9,} {r['images']:>13,} "
                   f"{r['epochs']:>7.2f} {step:>10} {feed:>10}  {r['resident_gb']:>6.1f}GB  {verdict}")
    return out
