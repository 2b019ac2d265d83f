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

import re
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastvit.train.config import ConfigError
from fastvit.train.results import Results

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Budget:
    label: str              # as the user wrote it: 2m, 30s, 1.5h, 3ep
    seconds: float | None   # wall-clock budget; None for an image (epochs) budget
    epochs: float | None = None

    def flags(self, share: float = 1.0) -> list[str]:
        """fastvit-train's budget flags for `share` of this budget."""
        if self.seconds is not None:
            return ["--minutes", f"{share * self.seconds / 60.0:.6g}"]
        return ["--epochs", f"{share * self.epochs:.6g}"]

    @property
    def size(self) -> float:
        return self.seconds if self.seconds is not None else self.epochs


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
    flags: tuple = ()       # fastvit-train flags beyond data/out/preset/config: budget, seed, WSD settings
    kind: str = "run"       # run (independent), trunk (WSD stable segment) or branch (WSD decay)
    parents: tuple = ()     # WSD branch: the trunk segments' run dirs it continues
    weight_s: float = 0.0   # its own budget (progress bar); 0: the budget's
    after: tuple = ()       # run dirs that must be finished before it starts (WSD: the segment it continues)

    @property
    def finished(self) -> bool:
        return Results.exists(self.run_dir)

    @property
    def weight(self) -> float:
        """Progress-bar weight: its budget in seconds (1 for image budgets)."""
        return self.weight_s or self.budget.seconds or 1.0


def _sorted(budgets: list[Budget]) -> list[Budget]:
    if len({b.seconds is None for b in budgets}) > 1:
        raise ConfigError("give all budgets as times (s, m, h) or all as epochs (ep)")
    return sorted(budgets, key=lambda b: b.size)


def _job(out: Path, v: str, b: Budget, s: int, name: str, flags: list[str], **kw) -> Job:
    return Job(v, b, s, out / "runs" / slug(v) / name / f"s{s}", out / "configs" / f"{slug(v)}.yaml",
               out / "logs" / f"{slug(v)}__{name}__s{s}.log", tuple(flags), **kw)


def plan_jobs(out: Path, variants: list[str], budgets: list[Budget], seeds: int) -> list[Job]:
    """Independent runs: one complete run per (variant, budget, seed), budget by budget."""
    return [_job(out, v, b, s, slug(b.label), [*b.flags(), "--seed", str(s)])
            for b in _sorted(budgets) for v in variants for s in range(seeds)]


def plan_wsd_jobs(out: Path, variants: list[str], budgets: list[Budget], seeds: int, share: float = 0.2) -> list[Job]:
    """Warmup-stable-decay: per (variant, seed) one constant-LR trunk, run as segments that each end where
    a budget's decay starts ((1 − share)·B_k) and continue the previous segment (--init-from); from each
    segment a branch of share·B_k decays the LR linearly to 0 (warmup 0) and gives budget B_k's point.
    Trunk segments after the first skip the warm-up and take seed + 1000·k (a new data order)."""
    jobs, prev_b = [], {}
    for k, b in enumerate(_sorted(budgets)):
        for v in variants:
            for s in range(seeds):
                last, trunks = prev_b.get((v, s), (None, ()))
                seg = (b.size - (last.size if last else 0.0)) / b.size * (1 - share)
                tflags = [*b.flags(seg), "--seed", str(s + 1000 * k), "--lr-decay", "constant"]
                if trunks:
                    tflags += ["--warmup", "0", "--init-from", str(trunks[-1])]
                trunk = _job(out, v, b, s, f"wsd-trunk-{slug(b.label)}", tflags, kind="trunk",
                             weight_s=seg * (b.seconds or 0.0), after=trunks[-1:])
                branch = _job(out, v, b, s, f"{slug(b.label)}-wsd",
                              [*b.flags(share), "--seed", str(s), "--lr-decay", "linear", "--warmup", "0",
                               "--init-from", str(trunk.run_dir)], kind="branch",
                              parents=(*trunks, trunk.run_dir), weight_s=share * (b.seconds or 0.0),
                              after=(trunk.run_dir,))
                jobs += [trunk, branch]
                prev_b[(v, s)] = (b, (*trunks, trunk.run_dir))
    return jobs


def train_command(job: Job, data: str, preset: str, device: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "fastvit.train.cli", "--data", str(data), "--out", str(job.run_dir),
           "--preset", preset, "--config", str(job.config), *job.flags, "--no-progress"]
    if device:
        cmd += ["--device", device]
    if job.run_dir.exists():
        cmd.append("--overwrite")          # a killed run: start it over (one uninterrupted run per point)
    return cmd


_LIVE: set = set()          # the training processes running now (a stopped sweep stops them)
_LIVE_LOCK = threading.Lock()
_STOPPING = threading.Event()


def subprocess_runner(job: Job, cmd: list[str], env: dict | None = None) -> int:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "w") as f:
        with _LIVE_LOCK:                    # a sweep being stopped starts nothing more
            if _STOPPING.is_set():
                return 130
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
            _LIVE.add(proc)
        try:
            return proc.wait()
        finally:
            _LIVE.discard(proc)


def _stop_live(timeout: float = 30.0) -> None:
    """SIGTERM to every training still running (each checkpoints and exits; the sweep re-runs it whole)."""
    import time

    with _LIVE_LOCK:
        _STOPPING.set()
        live = list(_LIVE)
    for p in live:
        p.terminate()
    end = time.monotonic() + timeout
    for p in list(_LIVE):
        try:
            p.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


def slot_env(slot: int, jobs_at_once: int, device: str | None, base: dict | None = None) -> tuple[dict, list[str]]:
    """The environment and extra fastvit-train flags of parallel slot `slot` of `jobs_at_once`.

    The cores this process may use are shared out: OMP_NUM_THREADS (unless already set) and loader workers
    = max(1, cores // jobs), so N runs don't each start a thread per core.
    CUDA: slot k sees one GPU, k mod the GPUs visible (CUDA_VISIBLE_DEVICES), so N runs on N GPUs run one
    per GPU and more runs than GPUs share them round-robin."""
    import os

    from fastvit.sysinfo import default_workers

    env = dict(os.environ if base is None else base)
    if jobs_at_once <= 1:
        return env, []
    share = max(1, default_workers() // jobs_at_once)
    if not env.get("OMP_NUM_THREADS"):          # one already set (e.g. OMP_NUM_THREADS=1 on a cluster) is kept
        env["OMP_NUM_THREADS"] = str(share)
    flags = ["--workers", str(share)]
    if device is None or str(device).startswith("cuda"):
        visible = [v for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if not visible:
            try:
                import torch

                visible = [str(i) for i in range(torch.cuda.device_count())]
            except Exception:               # noqa: BLE001 - no torch CUDA: CPU runs
                visible = []
        if visible:
            env["CUDA_VISIBLE_DEVICES"] = visible[slot % len(visible)]
    return env, flags


def run_jobs(jobs: list[Job], data: str, preset: str, device: str | None, *,
             runner: Callable[[Job, list[str], dict], int] | None = None, progress: bool = True, say=print,
             jobs_at_once: int = 1, own_workers: set = frozenset()) -> list[Job]:
    """Runs the unfinished jobs, `jobs_at_once` at a time, each when the runs it continues have finished
    (WSD); returns the failed ones (and those whose WSD parent failed). One bar over the whole sweep,
    weighted by budget seconds; its ETA is the budgets still to run plus, per run, the mean overhead
    measured so far (start-up, final validation: a run takes longer than its budget), over the slots."""
    import time
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from tqdm import tqdm

    runner = runner or subprocess_runner
    n = max(1, int(jobs_at_once))
    done = sum(j.weight for j in jobs if j.finished)
    todo = [j for j in jobs if not j.finished]
    say(f"sweep: {len(jobs)} runs, {len(jobs) - len(todo)} already finished, {len(todo)} to run"
        + (f", {n} at a time" if n > 1 else ""))
    failed, overheads = [], []
    bad_dirs: set = set()
    bar = tqdm(total=sum(j.weight for j in jobs), initial=done, disable=not progress, unit="budget-s",
               dynamic_ncols=True, file=sys.stderr, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} budget-s "
               "[{elapsed}] {postfix}")
    _STOPPING.clear()

    def start(pool, j, slot):
        env, flags = slot_env(slot, n, device)
        if j.variant in own_workers:        # the variant (or --set) chose its loader workers
            flags = []
        left = [j2 for j2 in todo if j2 not in running.values()]
        over = sum(overheads) / len(overheads) if overheads else 0
        eta = (sum(j2.weight for j2 in left) + len(left) * over) / n
        bar.set_postfix_str(f"ETA {eta / 60:.0f} min{'' if overheads else ' + overheads'}: "
                            f"{j.variant} {j.budget.label} seed {j.seed}")
        cmd = train_command(j, data, preset, device) + flags
        return pool.submit(lambda: (time.monotonic(), runner(j, cmd, env), time.monotonic()))

    running: dict = {}          # future -> job
    slots: dict = {}            # future -> slot
    try:
        with ThreadPoolExecutor(max_workers=n) as pool:
            try:
                while todo or running:
                    for j in list(todo):
                        if len(running) >= n:
                            break
                        if j in running.values():
                            continue
                        if any(a in bad_dirs for a in j.after):
                            todo.remove(j)
                            bad_dirs.add(j.run_dir)
                            failed.append(j)
                            say(f"sweep: {j.variant} {j.budget.label} seed {j.seed} not run: the run it continues failed")
                            continue
                        if not all(Results.exists(a) for a in j.after):
                            continue
                        slot = min(set(range(n)) - set(slots.values()))
                        fut = start(pool, j, slot)
                        running[fut], slots[fut] = j, slot
                    if not running:
                        for j in todo:              # waits on a run that is not in this sweep
                            failed.append(j)
                            say(f"sweep: {j.variant} {j.budget.label} seed {j.seed} not run: what it continues is missing")
                        break
                    finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for fut in finished:
                        j = running.pop(fut)
                        slots.pop(fut)
                        todo.remove(j)
                        t0, rc, t1 = fut.result()
                        if j.budget.seconds:
                            overheads.append(max(0.0, t1 - t0 - j.weight))
                        if rc != 0 or not j.finished:
                            failed.append(j)
                            bad_dirs.add(j.run_dir)
                            tail = j.log.read_text().strip().splitlines()[-1:] if j.log.is_file() else []
                            say(f"sweep: {j.variant} {j.budget.label} seed {j.seed} failed (exit {rc}): {' '.join(tail)}")
                        bar.update(j.weight)
            except KeyboardInterrupt:
                _stop_live()       # before the pool waits for its threads
                raise
    finally:
        bar.close()
    return failed


def _results(run_dir: Path) -> Results:
    return Results.read(run_dir)


def collect(jobs: list[Job]) -> list[dict]:
    """One row per finished budget point, from its results.json. A WSD branch is labelled '<variant> (wsd)'
    and counts the images, steps and counted seconds of the trunk segments it continues."""
    rows = []
    for j in jobs:
        if j.kind == "trunk" or not j.finished or not all(Results.exists(p) for p in j.parents):
            continue
        r = _results(j.run_dir)
        chain = [_results(p) for p in j.parents] + [r]
        rows.append({"variant": j.variant + (" (wsd)" if j.kind == "branch" else ""), "budget": j.budget.label,
                     "budget_s": j.budget.seconds, "seed": j.seed, "top1": r["top1"], "ema_top1": r.get("ema_top1"),
                     "top5": r.get("top5"), "images_seen": sum(c["images_seen"] for c in chain),
                     "counted_s": round(sum(c["counted_s"] for c in chain), 3), "steps": sum(c["steps"] for c in chain),
                     "recipe": r.get("recipe"), "model": r.get("model"), "run_dir": str(j.run_dir)})
    return rows


def wsd_saving(jobs: list[Job], share: float) -> dict:
    """What WSD spends against independent runs of the same points: planned budget (seconds or epochs)
    and, for the finished runs, counted seconds."""
    points = [j for j in jobs if j.kind == "branch"]
    independent = sum(j.budget.size for j in points)
    wsd = sum(j.budget.size * (share if j.kind == "branch" else 0.0) for j in jobs) + sum(
        max(j.budget.size for j in points if (j.variant, j.seed) == key) * (1 - share)
        for key in {(j.variant, j.seed) for j in points})
    done = [j for j in jobs if j.finished]
    return {"independent_budget": independent, "wsd_budget": wsd, "saving": 1 - wsd / independent if independent else 0.0,
            "wsd_counted_s": round(sum(_results(j.run_dir)["counted_s"] for j in done), 3), "unit":
            "seconds" if points and points[0].budget.seconds else "epochs"}
