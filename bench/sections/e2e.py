"""bench section 'e2e': the real training loop (real loader, real model, optimizer, EMA) per stage.

Runs `fastvit-train` in-process on a short time budget and reads its metrics back:
  e2e/images_per_s@<res>,keep<k>      training images/s of each stage (steady state: the first logged
                                      interval of a stage, which holds its compile/switch, is left out)
  e2e/data_wait_share@<res>,keep<k>   share of that stage's step time spent waiting for the loader
  e2e/gpu_busy@<res>,keep<k>          (GPU only) time the GPU spent in kernels ÷ wall time, from a
                                      torch.profiler window of --profile-steps steps in every stage
                                      (fastvit.train.profile.BusyWindow: union of CUDA kernel/memcpy
                                      intervals over the host wall time between two syncs; windows of
                                      a shape pooled, weighted by wall time). Waiting for the loader and
                                      host stalls inside a step count as idle.
  e2e/cpu_op_busy@<res>,keep<k>       (CPU run) the same window over CPU operators: a CPU number
  e2e/step_span_share@<res>,keep<k>   (GPU only) Σ per-step span between CUDA events recorded before a
                                      step's first launch and after its last ÷ Σ wall time (StepTimer;
                                      gaps inside a step count as busy: an upper bound, not GPU-busy)
  e2e/speed_over_probe@<res>,keep<k>  real images/s ÷ the images/s the planner's probe measured for that
                                      shape on synthetic on-device data (plan.json `probe_speed`, never
                                      rescaled by re-plans); below 1 = the real loop is slower than the
                                      bare step (data, logging), above 1 = the probe was pessimistic
  e2e/images_per_s@all                images seen / counted training time of the whole run
  e2e/switch_wait_over_median_step    the curriculum switch's worst data wait over the run's real median
                                      step: per resolution switch, the loader wait of the new stage's first
                                      logged interval (all its steps' waits: an upper bound on the worst
                                      single step's; the exact worst when the rows carry
                                      interval_max_wait_s) over the median step time of the run's other
                                      intervals (interval_s / steps); also e2e/switch_wait_s, e2e/median_step_s
  e2e/train_window_s, e2e/setup_s     counted seconds of training (counted_s - setup_s) and before the first
                                      step (data, model, compile + probe: the trainer counts them in its
                                      budget, so gpu_check budgets window + an allowance for them)
CPU: a tiny model at 32/64 px (a smoke run of the loop, not a performance claim); GPU: vit_small_local
on the 112→224 curriculum.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from . import SectionSkipped


def _demo_data(ctx) -> Path:
    """The synthetic demo set, prepped once into the scratch dir (ctx.opts["demo"]: make_demo_dataset's
    sizes; the default has 600 train images on a CPU, 3,000 on a GPU; ctx.opts["demo_res"]: the resolutions)."""
    from fastvit import manifest

    # GPU: 3,000 train images, more than two of the gpu preset's largest batch (1024) per epoch
    demo = dict(num_classes=10, train_per_class=300 if ctx.cuda else 60, val_per_class=10, min_side=64, max_side=200)
    demo.update(ctx.opts.get("demo", {}))
    resolutions = list(ctx.opts.get("demo_res", [32, 64, 128, 224] if ctx.cuda else [32, 64]))
    root = ctx.workdir("e2e")
    out = root / ("prepped_" + "_".join(f"{v}" for v in demo.values()) + "_" + "_".join(map(str, resolutions)))
    if manifest.path_of(out).is_file():
        return out
    try:
        from fastvit.data_prep import prep_dataset
        from fastvit.data_prep.demo import make_demo_dataset
    except ImportError as e:
        raise SectionSkipped(f"no data given and fastvit.data_prep is not available ({e})")
    src = make_demo_dataset(out.with_name(out.name + "_src"), seed=0, **demo)
    prep_dataset(src, out, resolutions=resolutions, formats=("ffcv", "dali"),
                 splits=("train", "val"), quality=90, workers=max(1, ctx.workers), progress=False)
    return out


def per_stage(rows: list[dict]) -> dict[tuple[int, float], dict]:
    """Sum the logged intervals of each (res, keep), skipping each stage's first interval."""
    acc: dict = defaultdict(lambda: {"s": 0.0, "wait": 0.0, "images": 0, "compute": 0.0})
    seen = set()
    for r in rows:
        if r.get("kind") != "train" or not r.get("interval_s"):
            continue
        key = (r["res"], r["keep"])
        if (key, r["stage"]) not in seen:         # first interval of a stage: compile / loader switch
            seen.add((key, r["stage"]))
            continue
        a = acc[key]
        a["s"] += r["interval_s"]
        a["wait"] += r["interval_wait_s"]
        a["images"] += r["interval_images"]
        a["compute"] += r.get("interval_compute_s") or 0.0
    return {k: v for k, v in acc.items() if v["s"] > 0}


def probe_speeds(plan: dict) -> dict[tuple[int, float], float]:
    """(res, keep) -> the probe's images/s (the first probed stage of that shape)."""
    out: dict = {}
    for s in plan["stages"]:
        if s.get("probe_speed", 0) > 0:
            out.setdefault((s["res"], s["keep"]), s["probe_speed"])
    return out


def profiled_busy(rows: list[dict]) -> dict[tuple[int, float], float]:
    """(res, keep) -> busy share of its profiler windows (rows of kind "profile"), pooled by wall time."""
    acc: dict = defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        if r.get("kind") == "profile" and r.get("wall_s"):
            a = acc[(r["res"], r["keep"])]
            a[0] += r["busy_s"]
            a[1] += r["wall_s"]
    return {k: b / w for k, (b, w) in acc.items() if w > 0}


def switch_wait(rows: list[dict]) -> dict[str, float]:
    """The curriculum switch's worst data wait over the run's median step (see the module docstring)."""
    import statistics

    train = [r for r in rows if r.get("kind") == "train" and r.get("interval_s") and r.get("batch")]
    firsts, steady, prev = [], [], None
    for r in train:
        if prev is not None and r["res"] != prev:
            firsts.append(r)
        elif prev is not None:
            steady.append(r)                      # (the run's first interval holds start-up: neither)
        prev = r["res"]
    steps = [(r, r["interval_images"] / r["batch"]) for r in steady]
    per_step = [r["interval_s"] / n for r, n in steps if n > 0]
    if not firsts or not per_step:
        return {}
    median = statistics.median(per_step)
    worst = max(r.get("interval_max_wait_s", r["interval_wait_s"]) for r in firsts)
    return {"e2e/switch_wait_s": worst, "e2e/median_step_s": median,
            "e2e/switch_wait_over_median_step": worst / median if median > 0 else float("inf"),
            "e2e/switch_wait_exact": float(all("interval_max_wait_s" in r for r in firsts))}


def stage_metrics(rows: list[dict], plan: dict, cuda: bool) -> dict[str, float]:
    """Per-stage metrics of a finished run's metrics rows and plan (see the module docstring)."""
    probe = probe_speeds(plan)
    out: dict[str, float] = {}
    for (r, k), busy in sorted(profiled_busy(rows).items()):
        out[f"e2e/{'gpu_busy' if cuda else 'cpu_op_busy'}@{r},keep{k:g}"] = busy
    for (r, k), a in sorted(per_stage(rows).items()):
        tag = f"{r},keep{k:g}"
        ips = a["images"] / a["s"]
        out[f"e2e/images_per_s@{tag}"] = ips
        out[f"e2e/data_wait_share@{tag}"] = a["wait"] / a["s"]
        if cuda:                                  # CUDA-event step spans; host time on CPU is no GPU's
            out[f"e2e/step_span_share@{tag}"] = a["compute"] / a["s"]
        if probe.get((r, k)):
            out[f"e2e/speed_over_probe@{tag}"] = ips / probe[(r, k)]
    out.update(switch_wait(rows))
    return out


def run(ctx) -> dict:
    import torch

    from fastvit.train.config import make_config
    from fastvit.train.loop import train

    data = Path(ctx.data) if ctx.data else _demo_data(ctx)
    run_dir = ctx.workdir("e2e") / ("run_gpu" if ctx.cuda else "run_cpu")
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    if ctx.cuda:
        from fastvit.data import DataError, open_dataset

        try:
            ds = open_dataset(data)
        except DataError as e:
            raise SectionSkipped(f"--data: {e}") from None
        over = dict(data=str(data), out=str(run_dir), device="cuda", minutes=1.0 if ctx.quick else 4.0,
                    model="vit_small_local", final_res=min(224, max(ds.resolutions)), evals=0,
                    progress=False, log_every=10, profile_steps=200)
        over.update(ctx.opts.get("train", {}))
        cfg = make_config("gpu", over)
    else:
        over = dict(data=str(data), out=str(run_dir), device="cpu", minutes=0.3 if ctx.quick else 1.0,
                    model="vit_tiny_local", depth=2, embed_dim=64, num_heads=2, final_res=64,
                    curriculum="32:0.5,64:0.5", batch_size=32, max_batch=128, evals=0, eval_images=64,
                    progress=False, log_every=5, compile=False, workers=ctx.workers, profile_steps=3)
        over.update(ctx.opts.get("train", {}))
        cfg = make_config("cpu", over)
    res = train(cfg, log=print if ctx.opts.get("verbose") else (lambda s: None))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    plan = json.loads((run_dir / "plan.json").read_text())
    out = stage_metrics(rows, plan, ctx.cuda)
    if not ctx.cuda:
        for (r, k) in sorted(per_stage(rows)):
            ctx.skip(f"e2e/gpu_busy@{r},keep{k:g}", "needs a CUDA GPU (CPU run: no GPU to keep busy)")
    train_s = res["counted_s"] - plan["setup_s"]
    if train_s > 0:
        out["e2e/images_per_s@all"] = res["images_seen"] / train_s
    out["e2e/train_window_s"], out["e2e/setup_s"] = train_s, plan["setup_s"]
    out["e2e/top1_smoke"] = res["top1"]
    if res.get("compile_s"):                      # ahead-of-time compile of every shape (counted)
        out["e2e/compile_s"] = res["compile_s"]
    if torch.cuda.is_available() and ctx.cuda:
        torch.cuda.empty_cache()
    return out
