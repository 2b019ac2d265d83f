"""Coarse tokens from one master patch weight: PI-resize vs pool (the same weights on the pooled patch),
at one budget, several seeds, every run at once (they share the machine's load alike).

    OMP_NUM_THREADS=1 python bench/tokens_resize.py --data OUT --minutes 2 --seeds 2 --out DIR

Every (mode, seed) is one fastvit-train run in DIR/<mode>/s<seed> with bench/tokens_compare.py's
`tokens` variant (cpu preset, 96 px throughout, --tokens 32:0.5,16:0.5) and --token-resize <mode>.
Writes DIR/table.md, DIR/tokens_resize.json and DIR/load.txt (`uptime` before, every 30 s, after).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tokens_compare import result_row, train_cmd, write_results   # bench/ is on sys.path when run as a script

from fastvit.train.results import Results

MODES = ("pi", "pool")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def launch(a, mode: str, seed: int, out: Path) -> subprocess.Popen:
    run = out / mode / f"s{seed}"
    run.parent.mkdir(parents=True, exist_ok=True)
    cmd = train_cmd(a, run, seed, ["--curriculum", f"{a.final_res}:1", "--tokens", a.tokens, "--token-resize", mode])
    return subprocess.Popen(cmd, stdout=open(out / f"{mode}_s{seed}.log", "w"), stderr=subprocess.STDOUT)


def table(a, results: dict) -> list[str]:
    lines = [f"{a.minutes:g}-minute budget each, all runs at once, cpu preset, {a.final_res} px, tokens {a.tokens}\n",
             "| --token-resize | seed | top-1 (%) | EMA top-1 (%) | images seen |", "|---|---:|---:|---:|---:|"]
    for mode, rs in results.items():
        for r in rs:
            ema = "–" if r["ema_top1"] is None else f"{r['ema_top1']:.2f}"
            lines.append(f"| {mode} | {r['seed']} | {r['top1']:.2f} | {ema} | {r['images_seen']} |")
        t, e = [r["top1"] for r in rs], [r["ema_top1"] for r in rs if r["ema_top1"] is not None]
        sd = f" ± {statistics.stdev(t):.2f}" if len(t) > 1 else ""
        me = f"{statistics.mean(e):.2f}" if e else "–"
        lines.append(f"| **{mode}** | mean | **{statistics.mean(t):.2f}{sd}** | {me} | "
                     f"{statistics.mean(r['images_seen'] for r in rs):.0f} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed+seeds-1")
    ap.add_argument("--tokens", default="32:0.5,16:0.5")
    ap.add_argument("--final-res", type=int, default=96)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    load = [f"# before\n{uptime()}", "# during, every 30 s"]
    procs = {(m, s): launch(a, m, s, out) for s in range(a.first_seed, a.first_seed + a.seeds)
             for m in MODES}
    while any(p.poll() is None for p in procs.values()):
        time.sleep(30)
        load.append(uptime())
        (out / "load.txt").write_text("\n".join(load) + "\n")
    load.append(f"# after\n{uptime()}")
    (out / "load.txt").write_text("\n".join(load) + "\n")
    results: dict[str, list[dict]] = {}
    for (mode, seed), p in procs.items():
        print(f"{mode} s{seed}: exit {p.returncode}", flush=True)
        run = out / mode / f"s{seed}"
        if p.returncode or not Results.exists(run):
            continue
        results.setdefault(mode, []).append(result_row(run, seed))
    results = {m: sorted(rs, key=lambda r: r["seed"]) for m, rs in sorted(results.items())}
    write_results(out, table(a, results), results, "tokens_resize.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
