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
    from .auto import stage_flops
    from .run_planner import config_stages, probe_config, stage_rows

    stages = config_stages(cfg, env)
    if assumed:
        speeds = {s.shape: assumed.img_s(stage_flops(cfg, s, env.cuda), s.res, s.keep) for s in stages}
        setup_s = float(getattr(assumed, "compile_s_per_shape", None) or ASSUMED_COMPILE_S) * len({s.shape for s in stages})
        setup_how = f"assumed {setup_s / len({s.shape for s in stages}):.0f} s compile per shape"
    else:
        # measured here by the planner's probe (nothing is trained: synthetic steps at LR 0, weights restored)
        stages, speeds, setup_s = probe_config(cfg, env, stages, say=say)
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
    from .setup import open_data

    ds, final_res = open_data(cfg)
    backend = cfg.data.backend if cfg.data.backend not in (None, "auto") else "gpu_resident"
    why = "" if cfg.data.backend not in (None, "auto") else \
        "assumed: backend auto on a GPU machine without DALI (DALI installed there: dali)"
    return DryEnv(ds=ds, device=torch.device("cuda"), backend=backend, final_res=final_res, backend_why=why)


def _device_line(env) -> str:
    from .setup import device_name

    return f"{device_name(env)} (here), compile {'on' if env.compile else 'off'}, bf16 {'on' if env.amp else 'off'}"


def _gpu_bytes(cfg, env, assumed) -> float | None:
    """The GPU memory resident shards may take: --gpu-mem-share of the (assumed) GPU's memory."""
    from .run_planner import gpu_share_bytes

    if assumed is not None:
        return cfg.data.loader.gpu_mem_share * assumed.memory_gb * 1e9 if assumed.memory_gb else None
    return gpu_share_bytes(cfg, env)


def _budget_text(cfg) -> str:
    if cfg.budget_s is not None:
        return f"{cfg.budget_s / 3600:g} h = {cfg.budget_s:,.0f} s counted"
    return f"{cfg.budget.epochs:g} epochs of images"


def _plan(cfg, env, stages, speeds, setup_s: float):
    from .planner import BudgetTooSmall, plan_budget
    from .rules import budget_images, reserve_s

    try:
        if cfg.budget_s is None:
            return plan_budget(stages, budget_images=budget_images(cfg, env.ds.count("train")))
        return plan_budget(stages, speeds=speeds, budget_s=cfg.budget_s, setup_s=setup_s,
                           reserve_s=reserve_s(cfg.budget_s))
    except BudgetTooSmall as e:
        raise TrainError(str(e), 2) from None


def _choose(cfg, env, assumed, say):
    from . import auto
    from .budget import BudgetClock

    choice = auto.choose_for_run(cfg, env, BudgetClock(cfg.budget_s), say, assumed=assumed)
    for r in choice.rows:
        if r["top1"] is None:
            say(f"  {r['shape']:>19}  {r['params'] / 1e6:7.2f} M  {r['images']:>14,} images  not forecast: "
                f"{r['extrapolates']}  speed: {r['speed_from']}")
            continue
        grown = (f"  ({sum(r['images_shallow'].values()):,} shallow, D_eff {r['images_effective']:,})"
                 if "images_effective" in r else "")
        say(f"  {r['shape']:>19}  {r['params'] / 1e6:7.2f} M  {r['images']:>14,} images  top-1 {r['top1']:5.1f}% "
            f"[{r['interval'][0]:.1f}, {r['interval'][1]:.1f}]  speed: {r['speed_from']}{grown}"
            + (f"  (extrapolating: {r['extrapolates']})" if r["extrapolates"] else ""))
    return auto.apply(cfg, choice), choice.to_dict()


# ------------------------------------------------------------------------------------------------------
# the table

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
