"""Wall clock a fastvit-sweep spent per run, from its logs: WSD chains against independent runs of the same points.

    python bench/sweep_wall.py DIR [--variants a,b] [--out wall.md]

A run's log (DIR/logs/<variant>__<budget>__s<seed>.log) is created when the run starts and last written when
it ends, so birth → last write is the run's wall clock, set-up and final validation included (what the
budget does not count). Needs a filesystem that records birth times (ext4, xfs, btrfs on Linux ≥ 4.11).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path


def _birth(p: Path) -> float | None:
    out = subprocess.run(["stat", "-c", "%W", str(p)], capture_output=True, text=True)
    t = float(out.stdout.strip() or 0) if out.returncode == 0 else 0
    return t or None


def walls(sweep: Path) -> dict:
    """(variant, kind, seed) -> [(budget label, wall seconds)]; kind: run, trunk, branch."""
    out = defaultdict(list)
    for log in sorted((sweep / "logs").glob("*.log")):
        variant, budget, seed = log.stem.split("__")
        born = _birth(log)
        if born is None:
            raise SystemExit(f"sweep_wall: {log}: the filesystem records no birth time")
        kind = "trunk" if budget.startswith("wsd-trunk-") else "branch" if budget.endswith("-wsd") else "run"
        label = budget.removeprefix("wsd-trunk-").removesuffix("-wsd")
        out[(variant, kind, seed)].append((label, os.stat(log).st_mtime - born))
    return out


def report(sweep: Path, variants: list[str] | None) -> str:
    w = walls(sweep)
    names = sorted({v for v, k, _ in w if k != "run"} if variants is None else set(variants))
    lines = ["Wall clock per (variant, seed), minutes, set-up and validation included: WSD (trunk segments + "
             "branches) against the independent runs of the same budgets.", "",
             "| variant | seed | budgets | independent runs | WSD trunk | WSD branches | WSD total | saving |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    savings = []
    for v in names:
        for seed in sorted({s for vv, _, s in w if vv == v}):
            branches = dict(w.get((v, "branch", seed), []))
            runs = {b: t for b, t in w.get((v, "run", seed), []) if b in branches}
            if not branches or set(runs) != set(branches):
                continue
            trunk = sum(t for _, t in w.get((v, "trunk", seed), []))
            ind, br = sum(runs.values()), sum(branches.values())
            savings.append(1 - (trunk + br) / ind)
            lines.append(f"| {v} | {seed} | {','.join(branches)} | {ind / 60:.1f} | {trunk / 60:.1f} | {br / 60:.1f} | "
                         f"{(trunk + br) / 60:.1f} | {savings[-1]:.0%} |")
    if savings:
        lines += ["", f"Mean saving of wall clock: {statistics.mean(savings):.0%} over {len(savings)} (variant, seed) chains."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir")
    p.add_argument("--variants", help="comma list (default: those with WSD runs)")
    p.add_argument("--out", help="also write the table here")
    a = p.parse_args(argv)
    if not (Path(a.dir) / "logs").is_dir():
        print(f"sweep_wall: {a.dir}/logs not found: not a fastvit-sweep dir", file=sys.stderr)
        return 2
    text = report(Path(a.dir), a.variants.split(",") if a.variants else None)
    print(text, end="")
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
