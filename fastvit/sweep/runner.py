"""Run every (variant, budget, seed) of a sweep as a complete `fastvit-train` run, resumably.

    DIR/configs/<variant>.yaml          the variant's settings (common --set overrides + its own)
    DIR/runs/<variant>/<budget>/s<seed>  one fastvit-train run dir (results.json when finished)
    DIR/logs/<variant>__<budget>__s<seed>.log   its stdout/stderr

A run whose results.json exists is finished and never run again; a run dir without one (a killed
sweep) is started over with --overwrite, so every point is one uninterrupted run whose LR was annealed
at its own budget. Runs go budget by budget (all variants at the smallest budget first), so a sweep cut
short still compares the variants.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastvit.train.config import ConfigError

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Budget:
    label: str              # as the user wrote it: 2m, 30s, 1.5h, 3ep
    seconds: float | None   # wall-clock budget; None for an image (epochs) budget
    epochs: float | None = None

    def flags(self) -> list[str]:
        if self.seconds is not None:
            return ["--minutes", f"{self.seconds / 60.0:g}"]
        return ["--epochs", f"{self.epochs:g}"]


def parse_budget(text: str) -> Budget:
    """'2m', '30s', '1.5h' (wall clock) or '3ep' (epochs of images); one-line ConfigError otherwise."""
    t = text.strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(ep|s|m|h)", t)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"budget {text!r} must be a positive number with a unit: 30s, 2m, 1.5h or 3ep")
    v, unit = float(m.group(1)), m.group(2)
    if unit == "ep":
        return Budget(t, None, v)
    return Budget(t, v * UNITS[unit])


def parse_seconds(text: str) -> float:
    b = parse_budget(text)
    if b.seconds is None:
        raise ConfigError(f"{text!r} must be a time: 30s, 16m, 24h")
    return b.seconds


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", label)


@dataclass(frozen=True)
class Job:
    variant: str
    budget: Budget
    seed: int
    run_dir: Path
    config: Path
    log: Path

    @property
    def finished(self) -> bool:
        return (self.run_dir / "results.json").is_file()

    @property
    def weight(self) -> float:
        """Progress-bar weight: its budget in seconds (1 for image budgets)."""
        return self.budget.seconds or 1.0


def plan_jobs(out: Path, variants: list[str], budgets: list[Budget], seeds: int) -> list[Job]:
    jobs = []
    for b in sorted(budgets, key=lambda b: (b.seconds or 0.0, b.epochs or 0.0)):
        for v in variants:
            for s in range(seeds):
                jobs.append(Job(v, b, s, out / "runs" / slug(v) / slug(b.label) / f"s{s}", out / "configs" / f"{slug(v)}.yaml",
                                out / "logs" / f"{slug(v)}__{slug(b.label)}__s{s}.log"))
    return jobs


def train_command(job: Job, data: str, preset: str, device: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "fastvit.train.cli", "--data", str(data), "--out", str(job.run_dir),
           "--preset", preset, "--config", str(job.config), *job.budget.flags(), "--seed", str(job.seed),
           "--no-progress"]
    if device:
        cmd += ["--device", device]
    if job.run_dir.exists():
        cmd.append("--overwrite")          # a killed run: start it over (one uninterrupted run per point)
    return cmd


def subprocess_runner(job: Job, cmd: list[str]) -> int:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode


def run_jobs(jobs: list[Job], data: str, preset: str, device: str | None, *,
             runner: Callable[[Job, list[str]], int] | None = None, progress: bool = True, say=print) -> list[Job]:
    """Runs the unfinished jobs; returns the failed ones. One bar over the whole sweep, weighted by budget
    seconds; its ETA is the budgets still to run plus, per run, the mean overhead measured so far (start-up,
    final validation: a run takes longer than its budget)."""
    import time

    from tqdm import tqdm

    runner = runner or subprocess_runner
    done = sum(j.weight for j in jobs if j.finished)
    todo = [j for j in jobs if not j.finished]
    say(f"sweep: {len(jobs)} runs, {len(jobs) - len(todo)} already finished, {len(todo)} to run")
    failed, overheads = [], []
    bar = tqdm(total=sum(j.weight for j in jobs), initial=done, disable=not progress, unit="budget-s",
               dynamic_ncols=True, file=sys.stderr, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} budget-s "
               "[{elapsed}] {postfix}")
    try:
        for i, j in enumerate(todo):
            left = todo[i:]
            eta = sum(j2.weight for j2 in left) + len(left) * (sum(overheads) / len(overheads) if overheads else 0)
            bar.set_postfix_str(f"ETA {eta / 60:.0f} min{'' if overheads else ' + overheads'}: "
                                f"{j.variant} {j.budget.label} seed {j.seed}")
            t0 = time.monotonic()
            rc = runner(j, train_command(j, data, preset, device))
            if j.budget.seconds:
                overheads.append(max(0.0, time.monotonic() - t0 - j.budget.seconds))
            if rc != 0 or not j.finished:
                failed.append(j)
                tail = j.log.read_text().strip().splitlines()[-1:] if j.log.is_file() else []
                say(f"sweep: {j.variant} {j.budget.label} seed {j.seed} failed (exit {rc}): {' '.join(tail)}")
            bar.update(j.weight)
    finally:
        bar.close()
    return failed


def collect(jobs: list[Job]) -> list[dict]:
    """One row per finished run, from its results.json."""
    rows = []
    for j in jobs:
        if not j.finished:
            continue
        r = json.loads((j.run_dir / "results.json").read_text())
        rows.append({"variant": j.variant, "budget": j.budget.label, "budget_s": j.budget.seconds,
                     "seed": j.seed, "top1": r["top1"], "ema_top1": r.get("ema_top1"), "top5": r.get("top5"),
                     "images_seen": r["images_seen"], "counted_s": r["counted_s"], "steps": r["steps"],
                     "recipe": r.get("recipe"), "model": r.get("model"), "run_dir": str(j.run_dir)})
    return rows
