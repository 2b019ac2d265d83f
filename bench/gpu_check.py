#!/usr/bin/env python
"""`make gpu-check`: what the GPU machine must show, in one command, every part time-boxed.

    make gpu-check [OUT=dir]          # OUT from the environment works too; default bench/results/
    PYTHONPATH=. python3 bench/gpu_check.py --out DIR      # the same without make
    python bench/gpu_check.py [--out DIR] [--device cuda|cpu] [--parts tests,kernel,model,e2e]
                              [--total-s 475] [--box PART=SECONDS ...]

Installs nothing and needs no network: it runs from the checkout (the Makefile sets PYTHONPATH to the
repo; fastvit.kernels and fastvit.data_prep resolve from there, see fastvit/__init__.py) with the
packages already installed (no FFCV, no DALI needed). On a CUDA machine every part runs at the real
sizes; on a CPU machine the same parts run at tiny sizes and the JSON says its numbers are CPU numbers,
so this script is never first run on the GPU (tests/test_gpu_check.py runs it that way).

Parts, in order. Each is a child process in its own process group, killed when its time box (or the
whole run's --total-s) is up; a part that fails, dies or times out is named under "failed" with its
reason (and keeps the metrics it had saved), and the next part still runs:

  tests   pytest -m cuda over the test files that have cuda tests (all skipped on a CPU)
  kernel  bench section kernel: the fused patch embedding vs timm's, fwd+bwd, bf16, batch 256,
          224/128/64 px at keep 1 and 0.5
  model   bench section model: vit_small_local compiled one shape at a time (compile seconds apart
          from step times) vs timm vit_small_patch16_224 eager, bf16, batch 256, (224, 1), (224, 0.5),
          (128, 1), (64, 1), MFU against 790 TFLOP/s; timm first, so a time box cuts fastvit shapes
  e2e     the demo set generated and prepped here (fastvit's own .beton and webdataset writers), then
          fastvit-train (backend auto: the best loader installed) on a 3-minute budget (compile and probe
          included) over 64 -> 128 -> 224, with a torch.profiler window in every stage: GPU-busy (kernel
          time / wall) and data wait per stage, compile seconds per shape. A run killed by its time box
          still reports the stages its metrics.jsonl holds

Writes OUT/gpu-check-<machine>.json in the bench/results schema ({"machine", "metrics", "skipped",
"failed", "args"} plus "gpu_check": mode, what the numbers are, each part's status, seconds and log,
how GPU-busy was measured, the e2e run's backend and compile times) and OUT/gpu-check-logs/<part>.log.
Exit status: 0 when every part passed, 1 otherwise (the JSON is written either way).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PARTS = ("tests", "kernel", "model", "e2e")
# Time boxes on the GPU (seconds, together under 8 minutes); on a CPU the tiny parts take a few seconds.
GPU_BOX = {"tests": 80, "kernel": 60, "model": 120, "e2e": 215}
CPU_BOX = {"tests": 300, "kernel": 300, "model": 300, "e2e": 300}   # generous: shared, loaded CPUs
TOTAL_S = 475.0
CPU_TOTAL_S = 1200.0
PEAK_TFLOPS = 790.0   # measured bf16 dense matmul on the H200 (issue 16); the model section's MFU base

# Sizes per part: the real ones on a GPU, tiny ones on a CPU (same code paths).
GPU_OPTS = {
    "kernel": {"batch": 256, "resolutions": (224, 128, 64), "keeps": (0.5, 1.0), "iters": 20},
    # the locality-MLP microbench is the sparse-locality issue's: left out to keep the compiles in the box
    "model": {"batch": 256, "settings": [(224, 1.0), (224, 0.5), (128, 1.0), (64, 1.0)], "variants": ["local"],
              "timm_compiled": False, "compiled": True, "iters": 15, "timm_first": True, "locality": False},
    "e2e": {"demo": {"num_classes": 10, "train_per_class": 300, "val_per_class": 50, "min_side": 64,
                     "max_side": 320},
            "demo_res": [64, 128, 224], "verbose": True,
            "train": {"minutes": 3.0, "curriculum": "64:0.4,128:0.35,224:0.25", "keep_min": 1.0,
                      "final_res": 224, "profile_steps": 200, "log_every": 25, "backend": "auto"}},
}
CPU_OPTS = {
    "kernel": {"batch": 2, "resolutions": (32,), "keeps": (0.5, 1.0), "iters": 1},
    "model": {"batch": 4, "settings": [(32, 1.0), (32, 0.5)], "variants": ["local"], "timm_compiled": False,
              "compiled": False, "iters": 1, "timm_first": True},
    "e2e": {"demo": {"num_classes": 4, "train_per_class": 16, "val_per_class": 4, "min_side": 48, "max_side": 96},
            "demo_res": [32, 64], "verbose": True,
            # an image budget: the same steps however loaded the CPU is (a time budget could be all set-up)
            "train": {"minutes": None, "epochs": 2, "curriculum": "32:0.5,64:0.5", "batch_size": 8, "max_batch": 16,
                      "eval_images": 16, "profile_steps": 2, "log_every": 2, "workers": 1, "backend": "auto",
                      "ckpt_minutes": 10.0}},
}


# ---------------------------------------------------------------------------------------------- parent

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results"),
                   help="folder for the JSON and the logs (default: $OUT, else bench/results/)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    p.add_argument("--total-s", type=float, default=None,
                   help=f"the whole run's time box (default {TOTAL_S:g} on a GPU, {CPU_TOTAL_S:g} on a CPU)")
    p.add_argument("--box", action="append", default=[], metavar="PART=S", help="one part's time box in seconds")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)      # internal: run one part
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--partial", default=None, help=argparse.SUPPRESS)
    p.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in args.parts if x not in PARTS]
    if bad or not args.parts:
        p.error(f"unknown part(s) {','.join(bad) or '(none)'}; choose from {','.join(PARTS)}")
    boxes = {}
    for b in args.box:
        name, _, sec = b.partition("=")
        try:
            boxes[name] = float(sec)
        except ValueError:
            p.error(f"--box {b!r}: expected PART=SECONDS")
        if name not in PARTS or boxes[name] <= 0:
            p.error(f"--box {b!r}: expected PART=SECONDS with PART in {','.join(PARTS)} and SECONDS > 0")
    args.boxes = boxes
    if args.device not in (None, "cpu", "cuda") and not str(args.device).startswith("cuda:"):
        p.error(f"--device must be cpu or cuda, not {args.device!r}")
    return args


def detect_device(asked: str | None) -> str:
    import torch

    if asked and asked.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        sys.exit(2)
    return asked or ("cuda" if torch.cuda.is_available() else "cpu")


def machine_slug(machine: dict) -> str:
    name = machine.get("gpu") or f"cpu-{machine.get('cores')}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_part(name: str, args, device: str, box: float, out: Path, scratch: Path) -> dict:
    """One part in a child process (own process group), at most `box` seconds; its log in out/logs."""
    logs = out / "gpu-check-logs"
    logs.mkdir(parents=True, exist_ok=True)
    result, partial = scratch / f"{name}.result.json", scratch / f"{name}.partial.json"
    for f in (result, partial):
        f.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--device", device,
           "--result", str(result), "--partial", str(partial), "--scratch", str(scratch)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
               PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with open(logs / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=box)
            why = None if rc == 0 else f"the part's process exited with {rc}"
        except subprocess.TimeoutExpired:
            why = f"timeout after {box:g} s"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)    # stragglers (loader workers, a nested pytest)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
    seconds = time.perf_counter() - t0
    res = _read(result) or {"status": "failed", "metrics": {}, "skipped": {}, "info": {}}
    if why and res.get("status") == "ok":
        res["status"] = "failed"
    if res.get("status") != "ok":
        kept = _read(partial) or (e2e_from_run_dir(scratch, device.startswith("cuda")) if name == "e2e" else {})
        res["metrics"] = {**kept.get("metrics", {}), **res.get("metrics", {})}
        res["skipped"] = {**kept.get("skipped", {}), **res.get("skipped", {})}
        res["why"] = res.get("why") or why or "failed"
    res.update(seconds=round(seconds, 1), timeout_s=box, log=str((logs / f"{name}.log").relative_to(out))
               if (logs / f"{name}.log").is_relative_to(out) else str(logs / f"{name}.log"))
    return res


def e2e_from_run_dir(scratch: Path, gpu: bool) -> dict:
    """The e2e metrics of the stages a killed run logged (its metrics.jsonl and plan.json)."""
    run_dir = scratch / "e2e" / ("run_gpu" if gpu else "run_cpu")
    plan = _read(run_dir / "plan.json")
    if not plan or not (run_dir / "metrics.jsonl").is_file():
        return {}
    sys.path.insert(0, str(HERE))
    from sections.e2e import stage_metrics  # noqa: E402

    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:        # a line cut by the kill
            pass
    return {"metrics": stage_metrics(rows, plan, gpu), "skipped": {}}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    device = detect_device(args.device)
    sys.path.insert(0, str(HERE))
    from throughput import machine_info  # noqa: E402  (bench/throughput.py)

    from fastvit.fileio import write_json_atomic

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(os.environ.get("FASTVIT_BENCH_SCRATCH", "/tmp/fastvit-gpu-check")) / f"{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    gpu = device.startswith("cuda")
    boxes = {**(GPU_BOX if gpu else CPU_BOX), **args.boxes}
    if args.total_s is None:
        args.total_s = TOTAL_S if gpu else CPU_TOTAL_S
    machine = machine_info()
    t_start = time.perf_counter()
    metrics, skipped, failed, parts = {}, {}, {}, {}
    print(f"gpu_check: {'GPU' if gpu else 'CPU (tiny sizes: CPU numbers, not GPU ones)'} run on "
          f"{machine.get('gpu') or machine.get('cpu')}; parts {', '.join(args.parts)}; logs in "
          f"{out / 'gpu-check-logs'}", flush=True)
    for name in args.parts:
        left = args.total_s - (time.perf_counter() - t_start)
        if left < 5:
            failed[name] = f"not started: the whole run's {args.total_s:g} s were used up"
            parts[name] = {"status": "failed", "why": failed[name]}
            print(f"== {name}: {failed[name]}", flush=True)
            continue
        box = min(boxes[name], left)
        print(f"== {name} (time box {box:.0f} s)", flush=True)
        res = run_part(name, args, device, box, out, scratch)
        metrics.update(res.get("metrics", {}))
        skipped.update(res.get("skipped", {}))
        if res["status"] == "skipped":
            skipped[name] = res.get("why", "")
        elif res["status"] != "ok":
            failed[name] = res["why"]
        parts[name] = {k: res[k] for k in ("status", "seconds", "timeout_s", "log", "why", "info") if k in res}
        for k, v in sorted(res.get("metrics", {}).items()):
            print(f"  {k:<58s} {v:>12.4g}")
        print(f"  {name}: {res['status'].upper()}{': ' + res['why'] if res.get('why') else ''} "
              f"({res['seconds']:.0f} s)", flush=True)
    from fastvit.train.profile import METHOD_CPU, METHOD_CUDA

    total = time.perf_counter() - t_start
    e2e_info = parts.get("e2e", {}).get("info", {})
    result = {
        "machine": machine, "metrics": metrics, "skipped": skipped, "failed": failed,
        "args": {"command": "make gpu-check", "device": device, "parts": args.parts, "total_s": args.total_s,
                 "boxes": boxes},
        "gpu_check": {
            "mode": "gpu" if gpu else "cpu-tiny",
            "numbers": "gpu (real sizes)" if gpu else "cpu: tiny sizes on a CPU, a smoke run of every part; "
                                                       "not GPU numbers and not for comparison",
            "parts": parts, "total_s": round(total, 1),
            "gpu_busy_method": METHOD_CUDA if gpu else METHOD_CPU,
            "mfu_peak_tflops": PEAK_TFLOPS if gpu else None,
            "e2e": e2e_info,
        },
    }
    path = out / f"gpu-check-{machine_slug(machine)}.json"
    write_json_atomic(path, result)
    status = "all parts passed" if not failed else f"FAILED: {', '.join(f'{k} ({v})' for k, v in failed.items())}"
    shutil.rmtree(scratch, ignore_errors=True)   # the demo set and run dir (regenerated each run)
    print(f"gpu_check: {status}; {total:.0f} s; wrote {path}", flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------- child

def child_main(args) -> int:
    """Run one part here; write {"status", "metrics", "skipped", "info", "why"} to --result."""
    import traceback

    from fastvit.fileio import write_json_atomic

    gpu = args.device.startswith("cuda")
    try:
        res = PART_FUNCS[args.child](args, gpu)
    except BaseException as e:  # noqa: BLE001 - the parent names the part and goes on
        traceback.print_exc()
        res = {"status": "failed", "why": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    res.setdefault("metrics", {})
    res.setdefault("skipped", {})
    res.setdefault("info", {})
    write_json_atomic(Path(args.result), res)
    return 0


def _section(name: str, args, gpu: bool) -> dict:
    sys.path.insert(0, str(HERE))
    from sections import Context, SectionSkipped  # noqa: E402
    import importlib

    from fastvit.sysinfo import default_workers

    opts = dict((GPU_OPTS if gpu else CPU_OPTS)[name])
    ctx = Context(quick=False, device=args.device, workers=default_workers(None), opts=opts,
                  partial=Path(args.partial), scratch=Path(args.scratch))
    if not gpu:
        import torch

        torch.set_num_threads(1)
    try:
        metrics = importlib.import_module(f"sections.{name}").run(ctx)
    except SectionSkipped as e:
        return {"status": "skipped", "why": str(e)}
    return {"status": "ok", "metrics": metrics, "skipped": ctx.pop_notes()}


def part_tests(args, gpu: bool) -> dict:
    """pytest -m cuda over the test files that have cuda tests; pass/fail/skip counts and failed names."""
    files = sorted(str(f.relative_to(REPO)) for f in (REPO / "tests").glob("test_*.py")
                   if "mark.cuda" in f.read_text())
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "cuda", "-p", "no:cacheprovider", "-rfE", *files]
    print("$ " + " ".join(cmd), flush=True)
    # each line goes to the part's log as it comes: a part killed by its time box shows how far it got
    proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    proc.wait()
    text = "\n".join(lines)
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error", "deselected")}
    tail = next((x for x in reversed(lines) if x.strip()), "")
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail):
        counts["error" if what.startswith("error") else what] += int(n)
    failed_names = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)
    metrics = {f"tests/cuda_{k}": float(v) for k, v in counts.items() if k != "deselected"}
    info = {"files": files, "failed": failed_names, "summary": tail}
    if proc.returncode not in (0, 5) or counts["failed"] or counts["error"]:
        return {"status": "failed", "metrics": metrics, "info": info,
                "why": f"{counts['failed']} failed, {counts['error']} errors: {', '.join(failed_names[:8])}"
                       if failed_names else f"pytest exited with {proc.returncode}: {tail}"}
    skipped = {} if gpu else {"tests": "no CUDA GPU: every cuda test is skipped here (collected and run on a GPU)"}
    return {"status": "ok", "metrics": metrics, "info": info, "skipped": skipped}


def part_kernel(args, gpu: bool) -> dict:
    return _section("kernel", args, gpu)


def part_model(args, gpu: bool) -> dict:
    res = _section("model", args, gpu)
    if gpu and res.get("status") == "ok":   # MFU against the measured H200 peak (the section's is H100's)
        from fastvit.sysinfo import PEAK_BF16_TFLOPS

        for k in [k for k in res["metrics"] if "_tflops@" in k]:
            res["metrics"][k.replace("_tflops@", "_mfu790@")] = res["metrics"][k] / PEAK_TFLOPS
        res["info"] = {"section_mfu_peak_tflops": PEAK_BF16_TFLOPS["H100"]}
    return res


def part_e2e(args, gpu: bool) -> dict:
    res = _section("e2e", args, gpu)
    run_dir = Path(args.scratch) / "e2e" / ("run_gpu" if gpu else "run_cpu")
    results = _read(run_dir / "results.json") or {}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    res["info"] = {
        "backend": results.get("backend"), "device_name": results.get("device_name"),
        "compile_s": results.get("compile_s"), "compile_s_by_shape": results.get("compile_s_by_shape"),
        "steps": results.get("steps"), "stages": [{k: s.get(k) for k in ("res", "keep", "batch_size", "steps")}
                                                 for s in results.get("stages", [])],
        "profile_windows": [r for r in rows if r.get("kind") == "profile"],
        "train_overrides": (GPU_OPTS if gpu else CPU_OPTS)["e2e"]["train"],
    }
    return res


PART_FUNCS = {"tests": part_tests, "kernel": part_kernel, "model": part_model, "e2e": part_e2e}


if __name__ == "__main__":
    sys.exit(main())
