"""Image-size curriculum alone vs token-size schedule alone vs both, at one budget, several seeds.

    python bench/tokens_compare.py --data OUT --minutes 2 --seeds 2 --out DIR [--tokens 32:0.5,16:0.5]

Every (variant, seed) is one fastvit-train run (cpu preset) in DIR/<variant>/s<seed>; a run with a
results.json is not run again (rerun the command to continue). Writes DIR/table.md and DIR/tokens.json.
The variants, on the cpu preset (patch 16, final res 96):
  curriculum  the preset: 64 px then 96 px, patch 16 throughout
  tokens      96 px throughout, patch 32 then 16 (--tokens)
  both        64 px then 96 px and patch 32 then 16
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from fastvit.train.results import Results


def variants(tokens: str, final_res: int) -> dict[str, list[str]]:
    return {"curriculum": [],
            "tokens": ["--curriculum", f"{final_res}:1", "--tokens", tokens],
            "both": ["--tokens", tokens]}


def train_cmd(a, run: Path, seed: int, extra: list[str]) -> list[str]:
    """One evidence run: fastvit-train on the cpu preset at a's budget, seed `seed`, into `run`."""
    return [sys.executable, "-m", "fastvit.train.cli", "--data", a.data, "--out", str(run),
            "--minutes", f"{a.minutes:g}", "--device", "cpu", "--preset", "cpu", "--seed", str(seed),
            "--no-progress", "--overwrite", *extra]


def result_row(run: Path, seed: int) -> dict:
    """The numbers the tables show, from a finished run's results.json."""
    res = Results.read(run)
    return {"seed": seed, "top1": res["top1"], "ema_top1": res.get("ema_top1"),
            "images_seen": res["images_seen"], "steps": res["steps"]}


def write_results(out: Path, lines: list[str], results: dict, json_name: str) -> None:
    """table.md, the JSON of every run's row, and the table on stdout (shared with tokens_resize.py)."""
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / json_name).write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--tokens", default="32:0.5,16:0.5")
    ap.add_argument("--final-res", type=int, default=96)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    out = Path(a.out)
    results: dict[str, list[dict]] = {}
    for seed in range(a.seeds):                       # seed-major: an interrupted run still has every variant
        for name, extra in variants(a.tokens, a.final_res).items():
            run = out / name / f"s{seed}"
            if not (run / "results.json").is_file():
                run.parent.mkdir(parents=True, exist_ok=True)
                with open(out / f"{name}_s{seed}.log", "w") as f:
                    rc = subprocess.run(train_cmd(a, run, seed, extra), stdout=f, stderr=subprocess.STDOUT).returncode
                print(f"{name} s{seed}: exit {rc}", flush=True)
                if rc:
                    continue
            results.setdefault(name, []).append(result_row(run, seed))
    lines = [f"{a.minutes:g}-minute budget, cpu preset, tokens {a.tokens}\n",
             "| variant | top-1 (%) mean | per seed | EMA top-1 per seed | images seen per seed |",
             "|---|---:|---|---|---|"]
    for name, rs in results.items():
        t = [r["top1"] for r in rs]
        sd = f" ± {statistics.stdev(t):.2f}" if len(t) > 1 else ""
        ema = ", ".join("–" if r["ema_top1"] is None else f"{r['ema_top1']:.2f}" for r in rs)
        seen = ", ".join(str(r["images_seen"]) for r in rs)
        lines.append(f"| {name} | {statistics.mean(t):.2f}{sd} | {', '.join(f'{x:.2f}' for x in t)} | {ema} | {seen} |")
    write_results(out, lines, results, "tokens.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
