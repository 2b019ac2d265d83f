"""bench section 'compile': every graph the later parts need, compiled cold into the one shared cache.

bench/gpu_check.py points every part at one inductor cache (TORCHINDUCTOR_CACHE_DIR with the FX graph
cache and the AOT-autograd cache on, TRITON_CACHE_DIR inside it). This part fills it: each graph job
runs in its own process (`python bench/sections/compile.py JOB_JSON`), up to `parallel` at a time (a cold
compile is mostly single-threaded host work -- dynamo, AOT autograd, inductor lowering -- plus Triton or
C++ codegen in worker pools, so N at once take about the wall time of the slowest, not the sum). The
model and e2e parts then build the same graphs and load them from the cache (seconds, not a minute).

A job, by "kind":
  fastvit   fastvit_graph(variant) + compile_model(shapes=[(res, keep, batch)], amp, mode): what the model
            section times (bench/sections/model.py), the same seed, config and call
  timm      timm_graph(compiled=True, mode) and one training step at (res, batch): the model section's
            compiled timm
  e2e_warm  the e2e section (bench/sections/e2e.py) with an image budget instead of a time budget: the
            trainer plans the same stages, compiles every stage shape in its probe (the graphs the timed
            e2e run will ask for) and trains one epoch; it also preps the demo data the e2e part reuses
Metrics per job name: compile/seconds@NAME (wall time of the compiling call(s)), compile/process_s@NAME
(the whole job process: imports, model build, compile), compile/fxgraph_cache_{hit,miss}@NAME and
compile/aot_cache_{hit,miss}@NAME (inductor's counters: a hit means the graph came from the cache). A job
not finished when the part's time box ends is named under "skipped". The CPU run compiles one tiny graph
in two jobs one after the other (cold, then a fresh process warm from the cache): the cache's effect.
ctx.opts: "jobs" [job dicts with "name"], "parallel" (default 1), "job_timeout_s".
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TAG = "COMPILE_JOB_RESULT "


def run(ctx) -> dict[str, float]:
    jobs = list(ctx.opts.get("jobs", []))
    parallel = max(1, int(ctx.opts.get("parallel", 1)))
    timeout = float(ctx.opts.get("job_timeout_s", 3600))
    out: dict[str, float] = {}
    for j in jobs:
        ctx.skip(f"compile/seconds@{j['name']}", "not finished inside the compile part's time box")
    ctx.save_partial(out)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE.parent), str(HERE.parents[1])] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            job = {**job, "device": ctx.device, "scratch": str(ctx.scratch)}
            print(f"[compile] start {job['name']}", flush=True)
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), json.dumps(job)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            running.append((job, proc, time.perf_counter()))
        time.sleep(0.2)
        for item in list(running):
            job, proc, t0 = item
            if proc.poll() is None and time.perf_counter() - t0 < timeout:
                continue
            if proc.poll() is None:
                proc.kill()
            text = proc.communicate()[0]
            running.remove(item)
            name = job["name"]
            print("\n".join(f"[{name}] {ln}" for ln in text.splitlines() if not ln.startswith(TAG)), flush=True)
            res = next((json.loads(ln[len(TAG):]) for ln in text.splitlines() if ln.startswith(TAG)), None)
            if res is None:
                ctx.skip(f"compile/seconds@{name}", f"the job failed (exit {proc.returncode}); see the log")
                continue
            ctx._notes.pop(f"compile/seconds@{name}", None)
            out[f"compile/seconds@{name}"] = res["compile_s"]
            out[f"compile/process_s@{name}"] = time.perf_counter() - t0
            for k in ("fxgraph_cache_hit", "fxgraph_cache_miss", "aot_cache_hit", "aot_cache_miss"):
                out[f"compile/{k}@{name}"] = float(res["counters"].get(k, 0))
            ctx.save_partial(out)
    return out


def cache_counters() -> dict[str, int]:
    """Inductor's FX-graph-cache and AOT-autograd-cache hit/miss counts of this process so far."""
    from torch._dynamo.utils import counters

    ind, aot = counters["inductor"], counters["aot_autograd"]
    return {"fxgraph_cache_hit": ind.get("fxgraph_cache_hit", 0), "fxgraph_cache_miss": ind.get("fxgraph_cache_miss", 0),
            "aot_cache_hit": aot.get("autograd_cache_hit", 0), "aot_cache_miss": aot.get("autograd_cache_miss", 0)}


def _job(job: dict) -> float:
    """Build and compile one job's graph(s) here; seconds of the compiling call(s)."""
    import torch

    from sections import Context
    from sections.model import CPU_TINY, _fastvit_call, _timm_call, _train_step, fastvit_graph, timm_graph

    dev = torch.device(job["device"])
    amp = torch.bfloat16 if job.get("amp") == "bf16" else None
    overrides = CPU_TINY if job.get("tiny") else {}
    if dev.type == "cpu":
        torch.set_num_threads(1)             # as the model section on a CPU
    kind = job["kind"]
    if kind == "fastvit":
        from fastvit.models import compile_model

        model = fastvit_graph(job.get("variant", "local"), overrides, dev)
        mode = job.get("mode")
        runner = compile_model(model, shapes=[(job["res"], job["keep"], job["batch"])], amp_dtype=amp,
                               mode=None if mode in (None, "default") else mode)
        return sum(runner.compile_seconds.values())
    if kind == "timm":
        t, runner, _, mean, std = timm_graph(overrides, dev, compiled=True, mode=job.get("mode"))
        opt = torch.optim.AdamW(t.parameters(), lr=1e-4, fused=dev.type == "cuda")
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randint(0, 256, (job["batch"], 3, job["res"], job["res"]), dtype=torch.uint8, generator=g).to(dev)
        y = torch.randint(0, 1000, (job["batch"],), generator=g).to(dev)
        t0 = time.perf_counter()
        _train_step(runner, opt, x, y, amp, _timm_call(mean, std))()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0
    if kind == "e2e_warm":
        from sections import e2e

        ctx = Context(device=job["device"], workers=job.get("workers", 1), opts=job["opts"],
                      scratch=Path(job["scratch"]))
        t0 = time.perf_counter()
        e2e.run(ctx)
        return time.perf_counter() - t0
    raise ValueError(f"unknown compile job kind {kind!r}")


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    sys.path.insert(0, str(HERE.parent))
    seconds = _job(job)
    print(TAG + json.dumps({"compile_s": seconds, "counters": cache_counters()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
