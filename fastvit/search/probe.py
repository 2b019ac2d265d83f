"""Measured training speed of a candidate at the stages fastvit-train would plan, and the images that
speed buys in a budget -- the planner's own functions, so the search and the trainer count alike.

    speeds = probe_speeds(cfg, env)                          # {Stage.shape: images/s}, plus the stages
    images = images_in_budget(stages, speeds, budget_s)      # plan_budget's images for that budget

`probe_speeds` is fastvit-train's own probe (run_planner.probe_config): the candidate's model, optimizer
and training step built as a run builds them, the stages the config asks for (curriculum × keep schedule
× batch rule) timed on synthetic steps with the planner's out-of-memory halving. Set-up, compile and
evaluation time are not in these speeds: images_in_budget (run_planner's) is the training window's
share of them.
"""
from __future__ import annotations

from fastvit.stage import Stage
from fastvit.train.config import TrainConfig
from fastvit.train.run_planner import images_in_budget, probe_config

__all__ = ["images_in_budget", "probe_speeds", "speeds_from_json", "speeds_to_json"]


def probe_speeds(cfg: TrainConfig, env, num_classes: int) -> tuple[list[Stage], dict]:
    """(stages with their fitted batches, {Stage.shape: training images/s}) of cfg's model: the planner's
    own probe of the stages the config asks for (run_planner.probe_config)."""
    stages, speeds, _ = probe_config(cfg, env, num_classes=num_classes)
    return stages, speeds


def speeds_to_json(stages: list[Stage], speeds: dict) -> dict:
    return {"stages": [s.to_dict() for s in stages],
            "speeds": [[list(shape), float(v)] for shape, v in speeds.items()]}


def speeds_from_json(d: dict) -> tuple[list[Stage], dict]:
    stages = [Stage.from_dict(s) for s in d["stages"]]
    return stages, {tuple(shape): float(v) for shape, v in d["speeds"]}
