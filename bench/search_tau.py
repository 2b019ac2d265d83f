"""Does fastvit-search's training-free ranking predict accuracy? Kendall τ between each measure and the
top-1 of nets trained for equal budgets.

    python bench/search_tau.py --runs DIR [DIR ...] --data OUT --minutes 2 --out bench/results/search
    python bench/search_tau.py --from-json bench/results/search/tau_time.json --scaling cpu --out DIR

DIR: fastvit-sweep dirs (or any folder) holding finished fastvit-train runs (config.json + results.json);
each run's net becomes a fastvit.search Candidate (from its resolved model config) and is measured by the
search's own code (κ, L over 5 initialisations, probed speed at the preset's stages -> images in a budget
of --minutes). Top-1 is averaged over the seeds of a net. Writes OUT/tau.json and OUT/table.md.
τ > 0 means the measure orders the nets as their accuracy does (κ and the rank sums are negated: lower
is better for them). With --scaling (a scaling.json or a shipped prior's name: cpu, gpu) the scaling law's
forecast of top-1 is a measure too, at the probe's images in budget (training-free: what fastvit-search
ranks by by default) and at the images the runs saw. --from-json re-scores a previous tau.json's nets
without measuring anything.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from scipy.stats import kendalltau

from fastvit.models.configs import model_config
from fastvit.search import cli, rank
from fastvit.search.space import Candidate
from fastvit.train.results import Results


def finished_runs(dirs) -> list[Path]:
    return sorted(p.parent for d in dirs for p in Path(d).rglob("results.json") if (p.parent / "config.json").is_file())


def candidate_of(run: Path) -> Candidate:
    cfg = json.loads((run / "config.json").read_text())["model"]
    over = {k: v for k, v in cfg.items() if k != "name" and v is not None}
    v = model_config(cfg["name"], **over)
    return Candidate(v.depth, v.embed_dim, v.num_heads, v.mlp_ratio, v.patch_size, v.local)


def tau(xs, ys) -> dict:
    t, p = kendalltau(xs, ys)
    return {"tau": None if math.isnan(t) else round(float(t), 3), "p": None if math.isnan(p) else round(float(p), 4)}


def measure_nets(a) -> list[dict]:
    """Each distinct net of the finished runs under --runs, measured by fastvit-search's own code."""
    runs = finished_runs(a.runs)
    top1 = defaultdict(list)
    seen = defaultdict(list)
    for r in runs:
        res = Results.read(r)
        c = candidate_of(r)
        top1[c].append(res["top1"])
        seen[c].append(res["images_seen"])
    args = cli.build_parser().parse_args(["--data", a.data, "--hours", str(a.minutes / 60), "--device", a.device,
                                          "--out", a.cache or str(Path(a.out) / "search"), "--min-epochs", "0"])
    args.min_epochs = 0.0
    ctx = cli.setup(args)
    cands = sorted(top1, key=lambda c: c.key)
    rows = cli.measure_all(cands, ctx, 0.0, "measure")
    return [{"key": c.key, "top1": top1[c], "images_seen": seen[c], "kappa": r["kappa"], "length": r["length"],
             "params": r["params"], "images_in_budget": r["images"], "img_s": r["img_s"]} for c, r in zip(cands, rows)]


def measures_tau(nets: list[dict], law=None) -> dict:
    """{measure: {tau, p}} of every predictor against the nets' mean top-1."""
    acc = [sum(n["top1"]) / len(n["top1"]) for n in nets]
    k, ln, im = [n["kappa"] for n in nets], [n["length"] for n in nets], [n["images_in_budget"] for n in nets]
    seen = [sum(n["images_seen"]) / len(n["images_seen"]) for n in nets]
    rs = rank.rank_sum(k, ln)
    measures = {
        "κ alone (lower better)": [-x for x in k],
        "L alone (higher better)": ln,
        "rank sum κ+L (As-ViT)": [-x for x in rs],
        "images in budget (probe) alone": im,
        "rank sum κ+L+1·speed": [-x for x in rank.rank_sum(k, ln, im, 1.0)],
        "rank sum κ+L+2·speed (fastvit-search --rank asvit's default weight)":
            [-x for x in rank.rank_sum(k, ln, im, 2.0)],
        "images seen in training (not training-free)": seen,
        "params (fewer better)": [-n["params"] for n in nets],
    }
    if law is not None:
        measures["scaling law at the probe's images in budget (fastvit-search --rank law)"] = [
            law.predict(n["params"], max(1, n["images_in_budget"])) for n in nets]
        measures["scaling law at the images seen (not training-free)"] = [
            law.predict(n["params"], s) for n, s in zip(nets, seen)]
    return {name: tau(v, acc) for name, v in measures.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+")
    ap.add_argument("--data")
    ap.add_argument("--minutes", type=float, help="the runs' budget (images in budget at it)")
    ap.add_argument("--from-json", help="a previous tau.json: its nets' measures, nothing measured again")
    ap.add_argument("--scaling", help="scaling.json, or a shipped prior (cpu, gpu): the law's forecast as a measure")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", help="fastvit-search dir for the measured candidates (default: OUT/search)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--label", help="how the runs' budgets are named in the table (default: N-minute budgets)")
    a = ap.parse_args(argv)
    if a.from_json:
        prev = json.loads(Path(a.from_json).read_text())
        nets, minutes = prev["nets"], prev["minutes"]
    elif a.runs and a.data and a.minutes:
        nets, minutes = measure_nets(a), a.minutes
    else:
        ap.error("give --runs, --data and --minutes, or --from-json")
    if len(nets) < 3:
        print(f"search_tau: {len(nets)} distinct nets; need >= 3", file=sys.stderr)
        return 2
    law = None
    if a.scaling:
        from fastvit.scaling import ScalingError, load_law, load_prior

        try:
            law = load_law(a.scaling) if a.scaling.endswith(".json") else load_prior(a.scaling)
        except ScalingError as e:
            print(f"search_tau: {e}", file=sys.stderr)
            return 2
    taus = measures_tau(nets, law)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tau.json").write_text(json.dumps({"minutes": minutes, "nets": nets, "tau": taus,
                                              "law": None if law is None else law.describe()}, indent=1))
    label = a.label or f"{minutes:g}-minute budgets"
    runs = sum(len(n["top1"]) for n in nets)
    lines = [f"Kendall τ against mean top-1 over {len(nets)} nets ({runs} runs, {label}; images in budget "
             f"from the probe at {minutes:g} minutes)" + (f"; law: {law.describe()}" if law else "") + "\n",
             "| measure | τ | p |", "|---|---:|---:|"]
    lines += [f"| {n} | {t['tau']} | {t['p']} |" for n, t in taus.items()]
    lines += ["", "| net | top-1 (%) per seed | images seen | κ | L | params (M) | probe img/s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for n in sorted(nets, key=lambda n: -sum(n["top1"]) / len(n["top1"])):
        lines.append(f"| {n['key']} | {', '.join(f'{t:.2f}' for t in n['top1'])} | "
                     f"{', '.join(str(s) for s in n['images_seen'])} | {n['kappa']:.4g} | {n['length']:.4g} | "
                     f"{n['params'] / 1e6:.2f} | {n['img_s']:.1f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
