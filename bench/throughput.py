#!/usr/bin/env python
"""How fast every stage of fastvit is, next to the baselines, in one run.

    python bench/throughput.py [--quick] [--section prep,loader,kernel,model,e2e]
                               [--data OUT] [--src DIR] [--json FILE]

Each section lives in bench/sections/<name>.py and exposes `run(ctx) -> dict[str, float]`.
Metrics are named `section/what@setting`; ratios `section/A_over_B@setting`. A section that cannot
run here (no GPU, missing package, no data) raises `SectionSkipped("why")`: it is reported as
skipped, never with made-up numbers.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/sections as a plain package, independent of the cwd

from sections import SectionSkipped, Context  # noqa: E402
from fastvit.fileio import write_json_atomic  # noqa: E402
from fastvit.sysinfo import cpu_model  # noqa: E402

SECTIONS = ["prep", "loader", "kernel", "model", "e2e"]


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
    args = p.parse_args(argv)
    names = [s.strip() for s in args.section.split(",") if s.strip()]
    bad = [s for s in names if s not in SECTIONS]
    if bad or not names:
        p.error(f"unknown section(s) {','.join(bad) or '(none)'}; choose from {','.join(SECTIONS)}")
    args.sections = names
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    for path_arg in ("data", "src"):
        v = getattr(args, path_arg)
        if v is not None and not Path(v).exists():
            print(f"bench/throughput.py: error: --{path_arg} {v} does not exist", file=sys.stderr)
            return 2
    ctx = Context.from_args(args)
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    for name in args.sections:
        print(f"== {name} ==", flush=True)
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(f"sections.{name}")
            out = mod.run(ctx)
        except SectionSkipped as e:
            skipped[name] = str(e)
            print(f"  skipped: {e}")
            continue
        except Exception as e:  # a broken section must not hide the others' numbers
            failed[name] = f"{type(e).__name__}: {e}"
            print(f"  FAILED: {failed[name]}")
            traceback.print_exc()
            continue
        for k, v in out.items():
            metrics[k] = v
            print(f"  {k:<55s} {v:>12.4g}")
        for k, why in ctx.pop_notes().items():
            skipped[k] = why
            print(f"  skipped {k}: {why}")
        print(f"  ({time.perf_counter() - t0:.1f} s)")
    result = {"machine": machine_info(), "metrics": metrics, "skipped": skipped, "failed": failed,
              "args": {k: v for k, v in vars(args).items() if k != "sections"}}
    if args.json:
        write_json_atomic(Path(args.json), result)
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
