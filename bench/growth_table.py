"""Summarize bench/growth_evidence.sh runs: OUT/s<seed>_<variant>/results.json -> table.md + growth.json.

    .venv/bin/python bench/growth_table.py OUT [--into bench/results/growth]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from fastvit.train.results import Results

VARIANTS = ("none", "none_d2", "manual", "manual_keep", "auto")


def load_runs(out: Path) -> list[dict]:
    runs = []
    for d in sorted(out.glob("s*_*")):
        if not d.is_dir() or not Results.exists(d):
            continue
        seed, variant = d.name[1:].split("_", 1)
        r = Results.read(d)
        g = r.get("growth") or {}
        runs.append({
            "seed": int(seed), "variant": variant, "top1": r["top1"], "ema_top1": r.get("ema_top1"),
            "steps": r["steps"], "images_seen": r["images_seen"], "counted_s": r["counted_s"],
            "compile_s": r["compile_s"], "replans": r["replans"], "val_images": r["val_images"],
            "depth_per_stage": _merged([(s["res"], s["depth"], s["steps"]) for s in r["stages"]]),
            "growth_events": g.get("events", []),
        })
    return runs


def _merged(stages: list) -> list:
    """Neighbouring stages of the same (res, depth) (cut by re-plans) as one: [(res, depth, steps)]."""
    out: list = []
    for res, depth, n in stages:
        if out and out[-1][:2] == [res, depth]:
            out[-1][2] += n
        else:
            out.append([res, depth, n])
    return [tuple(x) for x in out]


def _choices(run: dict) -> str:
    out = []
    for e in run["growth_events"]:
        if e["kind"] == "choose":
            cands = ", ".join(f"d{c['depth']}: loss {c['loss']:.3f} × {c['step_time'] * 1e3:.0f} ms → {c['score']:.3f}"
                              for c in e["candidates"])
            out.append(f"step {e['step']}: {cands} (w {e['w']:.2f}) → depth {e['depth']}")
        elif e["kind"] == "grow":
            out.append(f"step {e['step']}: {e['from']}→{e['to']}")
    return "; ".join(out)


def table(runs: list[dict]) -> str:
    lines = ["| variant | seed | images seen | steps | top-1 (%) | EMA top-1 (%) | stages: res, depth × steps |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in sorted(runs, key=lambda r: (VARIANTS.index(r["variant"]) if r["variant"] in VARIANTS else 9, r["seed"])):
        stages = ", ".join(f"{res}px {f'd{d}' if d else 'all blocks'} ×{n}" for res, d, n in r["depth_per_stage"])
        lines.append(f"| {r['variant']} | {r['seed']} | {r['images_seen']:,} | {r['steps']:,} | {r['top1']:.2f} | "
                     f"{r['ema_top1']:.2f} | {stages} |")
    lines += ["", "| variant | mean images seen | mean steps | mean top-1 (%) | mean EMA top-1 (%) | seeds |",
              "|---|---:|---:|---:|---:|---:|"]
    for v in VARIANTS:
        rs = [r for r in runs if r["variant"] == v]
        if rs:
            m = lambda k: statistics.mean(r[k] for r in rs)
            lines.append(f"| {v} | {m('images_seen'):,.0f} | {m('steps'):,.0f} | {m('top1'):.2f} | {m('ema_top1'):.2f} | "
                         f"{len(rs)} |")
    auto = [r for r in runs if r["variant"] == "auto"]
    if auto:
        lines += ["", "AutoProg's choices (candidate: mean loss on the fixed training images × step time "
                      "(measured in the window)^w → score):", ""]
        lines += [f"- seed {r['seed']}: {_choices(r)}" for r in auto]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--into", default=None, help="also write table.md and growth.json here")
    a = ap.parse_args(argv)
    runs = load_runs(Path(a.out))
    if not runs:
        print(f"no finished runs under {a.out}", file=sys.stderr)
        return 1
    md = table(runs)
    print(md)
    for d in filter(None, (Path(a.out), Path(a.into) if a.into else None)):
        d.mkdir(parents=True, exist_ok=True)
        (d / "table.md").write_text(md)
        (d / "growth.json").write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
