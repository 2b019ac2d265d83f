"""Measured training speed of a candidate at the stages fastvit-train would plan, and the images that
speed buys in a budget -- the planner's own functions, so the search and the trainer count alike.

    speeds = probe_speeds(cfg, env)                          # {Stage.shape: images/s}, plus the stages
    images = images_in_budget(stages, speeds, budget_s)      # plan_budget's images for that budget

`probe_speeds` builds the candidate's model, optimizer and training step exactly as fastvit-train does
(fastvit.train.setup.build_parts, step.TrainStep), takes the stages the config asks for
(run_planner.config_stages: curriculum × keep schedule × batch rule) and times synthetic training steps per
stage shape with planner.fit_and_probe (its out-of-memory halving included). Set-up, compile and
evaluation time are not in these speeds: images_in_budget is the training window's share of them.
"""
from __future__ import annotations

import time

from fastvit.stage import Stage
from fastvit.train.config import TrainConfig
from fastvit.train.errors import TrainError, is_oom
from fastvit.train.rules import reserve_s
from fastvit.train.planner import BatchFallback, BudgetTooSmall, OutOfMemory, fit_and_probe, plan_budget


def probe_speeds(cfg: TrainConfig, env, num_classes: int) -> tuple[list[Stage], dict]:
    """(stages with their fitted batches, {Stage.shape: training images/s}) of cfg's model."""
    from fastvit.train.run_planner import config_stages, drop_path_rates, probe_aug
    from fastvit.train.setup import build_parts
    from fastvit.train.step import TrainStep

    parts = build_parts(cfg, env, num_classes)
    step_fn = TrainStep(parts, cfg.schedule, env)
    stages = config_stages(cfg, env)
    drop_path_of = drop_path_rates(cfg, stages)
    aug = probe_aug(cfg)

    def run(stage: Stage) -> None:
        parts.drop_path.set(drop_path_of[stage.kind])
        step_fn.synthetic(stage, aug)

    try:
        return fit_and_probe(stages, run, time.perf_counter, fallback=BatchFallback(cfg.schedule.batch_size,
                             cfg.schedule.lr_scaling), is_oom=is_oom, warmup=1,
                             iters=max(1, cfg.budget.probe_iters))
    except OutOfMemory as e:
        raise TrainError(str(e), 1) from None


def images_in_budget(stages: list[Stage], speeds: dict, budget_s: float) -> int:
    """Training images the planner would fit into `budget_s` seconds at these speeds (0 when none)."""
    try:
        plan = plan_budget(stages, speeds=speeds, budget_s=budget_s, reserve_s=reserve_s(budget_s))
    except BudgetTooSmall:
        return 0
    return plan.images_until(plan.total_steps)


def speeds_to_json(stages: list[Stage], speeds: dict) -> dict:
    return {"stages": [s.to_dict() for s in stages],
            "speeds": [[list(shape), float(v)] for shape, v in speeds.items()]}


def speeds_from_json(d: dict) -> tuple[list[Stage], dict]:
    stages = [Stage.from_dict(s) for s in d["stages"]]
    return stages, {tuple(shape): float(v) for shape, v in d["speeds"]}
