#!/usr/bin/env python
"""How fast every stage of fastvit is, next to the baselines, in one run.

    python bench/throughput.py [--quick] [--section prep,loader,decode,kernel,model,e2e]
                               [--data OUT] [--src DIR] [--json FILE] [--section-timeout S]

Each section lives in bench/sections/<name>.py and exposes `run(ctx) -> dict[str, float]`.
Metrics are named `section/what@setting`; ratios `section/A_over_B@setting`. A section that cannot
run here (no GPU, missing package, no data) raises `SectionSkipped("why")`: it is reported as
skipped, never with made-up numbers. Each section runs in a child process of its own process group,
at most --section-timeout seconds: a section that fails, dies or hangs is reported under "failed" with
its reason (e.g. "timeout after 600 s", its worker processes killed with it) and the others still run.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/sections as a plain package, independent of the cwd

from sections import SectionSkipped, Context  # noqa: E402
from fastvit.fileio import write_json_atomic  # noqa: E402
from fastvit.sysinfo import cpu_model  # noqa: E402

SECTIONS = ["prep", "loader", "decode", "kernel", "model", "e2e"]
SECTION_TIMEOUT_S = 3600.0  # the full sections take minutes; an hour means hung


def _version(mod: str) -> str | None:
    try:
        m = importlib.import_module(mod)
        return getattr(m, "__version__", "unknown")
    except Exception:
        return None


def machine_info() -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "gpu": None,
        "versions": {m: _version(m) for m in ("torch", "torchvision", "timm", "ffcv", "nvidia.dali", "triton", "numba")},
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return info


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/throughput.py",
        description="Throughput of every fastvit stage next to its baseline, in one run.",
    )
    p.add_argument("--section", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})")
    p.add_argument("--quick", action="store_true", help="small sizes, few iterations (smoke run)")
    p.add_argument("--data", default=None, help="a fastvit-prep output dir (OUT) for loader/e2e")
    p.add_argument("--src", default=None, help="a JPEG tree (ImageNet layout or flat) for the prep section")
    p.add_argument("--json", default=None, metavar="FILE", help="write {machine, metrics, skipped} here")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--section-timeout", type=float, default=SECTION_TIMEOUT_S, metavar="S",
                   help=f"seconds a section may run before it (and its worker processes) is killed and reported "
                        f"as failed (default {SECTION_TIMEOUT_S:g})")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.section.split(",") if s.strip()]
    bad = [s for s in names if s not in SECTIONS]
    if bad or not names:
        p.error(f"unknown section(s) {','.join(bad) or '(none)'}; choose from {','.join(SECTIONS)}")
    if not args.section_timeout > 0:
        p.error(f"--section-timeout must be positive, got {args.section_timeout:g}")
    args.sections = names
    return args


def _section_child(name: str, args: argparse.Namespace, conn) -> None:
    """Runs in the section's child process (its own process group): sends back one result tuple."""
    os.setpgid(0, 0)  # the parent kills this group on timeout: FFCV's writer and loader workers included
    try:
        ctx = Context.from_args(args)  # here, not in the parent: no CUDA or thread state before the fork
        out = importlib.import_module(f"sections.{name}").run(ctx)
        res = ("ok", out, ctx.pop_notes())
    except SectionSkipped as e:
        res = ("skipped", str(e), {})
    except BaseException as e:  # a broken section must not hide the others' numbers
        traceback.print_exc()
        res = ("failed", f"{type(e).__name__}: {e}", {})
    sys.stdout.flush()
    conn.send(res)
    conn.close()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_section(name: str, args: argparse.Namespace, timeout: float) -> tuple[str, object, dict]:
    """One section in a forked child with its own process group, at most `timeout` seconds:
    ("ok", metrics, notes), ("skipped", why, {}) or ("failed", why, {}). On timeout the whole group is
    killed (a section's worker processes too); whatever the outcome, nothing of it outlives the call."""
    import multiprocessing as mp

    # fork: the child starts at once with this process's modules (no torch re-import per section, and
    # tests can stand in fake sections); the parent holds no CUDA context or threads when it forks.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    ctx = mp.get_context(method)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_section_child, args=(name, args, send), daemon=False)
    proc.start()
    send.close()
    try:
        try:
            os.setpgid(proc.pid, proc.pid)  # also from this side: no window where a kill would miss it
        except OSError:
            pass
        timed_out = False
        if recv.poll(timeout):  # a result, or the pipe closed by a child that died without one
            try:
                res = recv.recv()
            except EOFError:
                proc.join(5)
                res = ("failed", f"the section's process died (exit code {proc.exitcode})", {})
        else:
            timed_out, res = True, ("failed", f"timeout after {timeout:g} s", {})
        proc.join(0 if timed_out else 30)  # let a finished section exit by itself
        return res
    finally:
        _kill_group(proc.pid)  # stragglers (e.g. a writer's orphaned workers) and a timed-out section
        proc.join()
        recv.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    for path_arg in ("data", "src"):
        v = getattr(args, path_arg)
        if v is not None and not Path(v).exists():
            print(f"bench/throughput.py: error: --{path_arg} {v} does not exist", file=sys.stderr)
            return 2
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    for name in args.sections:
        print(f"== {name} ==", flush=True)
        t0 = time.perf_counter()
        kind, out, notes = run_section(name, args, args.section_timeout)
        if kind == "skipped":
            skipped[name] = out
            print(f"  skipped: {out}")
            continue
        if kind == "failed":
            failed[name] = out
            print(f"  FAILED: {out}")
            continue
        for k, v in out.items():
            metrics[k] = v
            print(f"  {k:<55s} {v:>12.4g}")
        for k, why in notes.items():
            skipped[k] = why
            print(f"  skipped {k}: {why}")
        print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    result = {"machine": machine_info(), "metrics": metrics, "skipped": skipped, "failed": failed,
              "args": {k: v for k, v in vars(args).items() if k != "sections"}}
    if args.json:
        write_json_atomic(Path(args.json), result)
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
