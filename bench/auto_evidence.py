"""Issue 22's evidence for `--model auto`: does the scaling law, fitted without a budget's runs, pick the shape
that budget trains best, and does `--model auto` end to end beat the `cpu` preset?

    python bench/auto_evidence.py --sweep SWEEP_DIR --out bench/results/auto [--preset-shape d4-w192]

SWEEP_DIR is a `fastvit-sweep` output whose variants are `fastvit+shape=<shape>` (the grid: every shape at every
budget and seed) and `fastvit+model=auto` (end-to-end `--model auto` runs at the same budgets and seeds, made in
the same sweep, so at the same load). From the runs' results.json alone (nothing typed in) it writes:

- evidence.json: every number below, recomputable;
- README table rows (table.md): per budget, the leave-one-budget-out pick, its forecast, its measured top-1, the
  grid's best, the regret; auto end to end against the preset; per shape, the measured top-1 at every budget;
- auto.png: measured top-1 against budget per shape (seeds as dots, means as lines) with `auto` marked, and the
  leave-one-budget-out forecasts against the measured means;
- runs/<variant>/<budget>/s<seed>/{results,plan}.json copied from the sweep (small).

Leave-one-budget-out (the issue's test): for budget b, the law err = E + A/N^alpha + B/D^beta is fitted on the
grid runs of the OTHER budgets only, twice: with alpha held at the shipped gpu prior's (chosen before the runs,
as the pilot and the cpu prior were fitted: a few model sizes may not determine it; `lobo`) and with all five
parameters free (as `fastvit-sweep --fit-scaling` fits; `lobo_free`). Each shape's images at b are forecast from its speed at the other budgets
(images seen / counted seconds, mean over those runs, times b's seconds), as `--model auto` forecasts from a
probe, so nothing measured at b enters the pick. Regret = the grid's best mean top-1 at b minus the pick's
measured mean top-1 at b (seeds averaged). Forecast error = forecast − measured mean, of the pick.

Growth as a candidate (`--growth-sweep DIR`: a second sweep with `fastvit+shape=<shape>+growth=manual` variants,
and any fixed-shape variants as its same-batch controls; `lobo_grow`): at each budget b the law fitted without b fits
its growth term (fastvit.scaling.fit_growth: c) on the growing runs of the other budgets, and the grown shapes
join the candidates (images and the share of them seen at each shallow depth forecast from the other budgets'
runs); regret is then against the best measured of the grid and the grown shapes. The same with one credit for
every shallow image whatever its depth (`lobo_const`: the credit the mean of the other budgets' growing runs
need; the form first tried). Beside it: the growing runs against the fixed shapes at each budget (does growth pay
here?), the credit each growing run needs under the grid's law, and the shipped cpu prior's forecast of each.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastvit.models.shapes import grow_label, param_count, parse_shape  # noqa: E402
from fastvit.scaling import ScalingError, choose, fit_growth, fit_law, load_prior  # noqa: E402
from fastvit.sweep.scaling_fit import images_shallow, split_shape  # noqa: E402
from fastvit.train.results import Results  # noqa: E402

AUTO_VARIANT = "fastvit+model=auto"


def read_runs(sweep: Path, classes: int) -> list[dict]:
    """One row per finished run of the sweep: variant, shape, params, budget, budget_s, seed, images, top1,
    counted_s and, for auto runs, the pick and its forecast (from results.json)."""
    rows = []
    with open(sweep / "sweep.csv") as f:
        for r in csv.DictReader(f):
            run_dir = Path(r["run_dir"])
            if not Results.exists(run_dir):
                continue
            res = Results.read(run_dir)
            _, shape = split_shape(r["variant"])
            row = {"variant": r["variant"], "budget": r["budget"], "budget_s": float(r["budget_s"]),
                   "seed": int(r["seed"]), "images": int(res["images_seen"]), "top1": float(res["top1"]),
                   "counted_s": float(res["counted_s"]), "run_dir": str(run_dir)}
            if r["variant"] == AUTO_VARIANT:
                pick = res["model_auto"]["pick"]
                pred = res.get("predicted_top1") or {}
                row.update(shape=pick["shape"], params=int(pick["params"]), predicted=pred.get("top1"),
                           interval=pred.get("interval"),
                           candidates=[{k: c.get(k) for k in ("shape", "images", "speed_from", "top1")}
                                       for c in res["model_auto"].get("rows", [])])
            elif shape:
                row.update(shape=shape, params=int(res.get("params") or param_count(shape, classes)))
                if "growth=manual" in r["variant"].split("+"):
                    depth = parse_shape(shape)["depth"]
                    row.update(shape=grow_label(shape), depth=depth, images_shallow=images_shallow(res, depth))
            else:
                continue
            rows.append(row)
    return rows


def _mean(xs):
    return statistics.fmean(xs) if xs else None


def grid_means(grid: list[dict]) -> dict:
    """{budget: {shape: {"top1": mean, "seeds": [...], "images": mean, "params": n}}}"""
    out: dict = {}
    for r in grid:
        cell = out.setdefault(r["budget"], {}).setdefault(r["shape"], {"seeds": [], "images_by_seed": [],
                                                                      "params": r["params"]})
        cell["seeds"].append(r["top1"])
        cell["images_by_seed"].append(r["images"])
    for cells in out.values():
        for c in cells.values():
            c["top1"] = _mean(c["seeds"])
            c["images"] = _mean(c["images_by_seed"])
    return out


def _point(r: dict) -> dict:
    return {k: r[k] for k in ("shape", "params", "images", "top1", "budget", "seed", "depth", "images_shallow")
            if k in r}


def run_credit(params: dict, r: dict) -> float:
    """The credit per shallow image that puts a growing run exactly on the law: D_eff solved from its top-1
    (err = E + A/N^alpha + B/D_eff^beta), less its images at full depth, over its shallow images."""
    rest = 1 - r["top1"] / 100 - params["E"] - params["A"] * r["params"] ** -params["alpha"]
    d_eff = (params["B"] / rest) ** (1 / params["beta"]) if rest > 0 else float("inf")
    shallow = sum(r["images_shallow"].values())
    return (d_eff - (r["images"] - shallow)) / shallow


def _const(c: dict, credit: float) -> dict:
    """A grown candidate forecast with one credit for every shallow image (the form first tried)."""
    shallow = sum(c["images_shallow"].values())
    return {k: v for k, v in c.items() if k not in ("depth", "images_shallow")} | \
        {"images": int(c["images"] - shallow + credit * shallow)}


def lobo(grid: list[dict], budgets: list[tuple[str, float]], fixed: dict, means: dict,
         grown: list[dict] = (), const: bool = False) -> list[dict]:
    """For each budget: the law fitted without it (`fixed`: parameters held; with `grown` runs, its growth term
    too), its pick among the grid's shapes (and the grown ones) at forecast images, the regret and the forecast
    error (and the plain most-images pick, for comparison). `const`: the grown shapes forecast with one credit
    per shallow image, the mean run_credit of the other budgets' growing runs, instead of the growth term."""
    out = []
    shapes = sorted({r["shape"] for r in grid}) + sorted({r["shape"] for r in grown})
    for b, secs in budgets:
        rest = [r for r in grid if r["budget"] != b]
        rest_grown = [r for r in grown if r["budget"] != b]
        row = {"budget": b, "budget_s": secs, "fitted_on": sorted({r["budget"] for r in rest})}
        try:
            law = fit_law([_point(r) for r in rest], fixed=fixed, loo=False)
            if rest_grown and const:
                row["credit"] = _mean([run_credit(law.params, r) for r in rest_grown])
            elif rest_grown:
                law = fit_growth(law, [_point(r) for r in rest_grown])
                row["c"] = law.growth["c"]
        except ScalingError as e:
            out.append({**row, "refused": str(e)})
            continue
        cands = []
        for s in shapes:
            runs = [r for r in rest + rest_grown if r["shape"] == s]
            if not runs:
                continue
            rate = _mean([r["images"] / r["counted_s"] for r in runs])
            c = {"shape": s, "params": runs[0]["params"], "images": int(rate * secs)}
            if "images_shallow" in runs[0]:           # a grown shape: the shares seen shallow, as at the other budgets
                c["depth"] = runs[0]["depth"]
                c["images_shallow"] = {k: int(c["images"] * _mean([r["images_shallow"].get(k, 0) / r["images"]
                                                                   for r in runs]))
                                       for k in sorted({k for r in runs for k in r["images_shallow"]})}
                if const:
                    c = _const(c, row["credit"])
            cands.append(c)
        ranked = choose(law, cands)
        pick = ranked[0]
        cells = {**means[b], **grid_means([r for r in grown if r["budget"] == b]).get(b, {})}
        best_shape = max(cells, key=lambda s: cells[s]["top1"])
        most_images = max(cands, key=lambda c: c["images"])["shape"]
        measured = cells[pick["shape"]]["top1"]
        out.append({**row, "law": law.describe(), "params": law.params,
                    "ranking": [{"shape": c["shape"], "params": c["params"], "forecast_images": c["images"],
                                 "forecast_top1": c["top1"], "measured_top1": cells[c["shape"]]["top1"]}
                                for c in ranked],
                    "pick": pick["shape"], "forecast_top1": pick["top1"], "measured_top1": measured,
                    "forecast_error": pick["top1"] - measured,
                    "best": best_shape, "best_top1": cells[best_shape]["top1"],
                    "regret": cells[best_shape]["top1"] - measured,
                    "most_images_pick": most_images,
                    "most_images_regret": cells[best_shape]["top1"] - cells[most_images]["top1"]})
    return out


def auto_vs_preset(auto: list[dict], means: dict, budgets, preset_shape: str) -> list[dict]:
    out = []
    for b, _ in budgets:
        runs = sorted((r for r in auto if r["budget"] == b), key=lambda r: r["seed"])
        pre = means.get(b, {}).get(preset_shape)
        if not runs or pre is None:
            continue
        top = _mean([r["top1"] for r in runs])
        out.append({"budget": b, "auto_picks": [r["shape"] for r in runs], "auto_seeds": [r["top1"] for r in runs],
                    "auto_top1": top, "auto_images": [r["images"] for r in runs],
                    "auto_predicted": [r.get("predicted") for r in runs],
                    "preset_shape": preset_shape, "preset_seeds": pre["seeds"], "preset_top1": pre["top1"],
                    "margin": top - pre["top1"], "auto_at_least_preset": top >= pre["top1"]})
    return out


def speed_check(auto: list[dict], means: dict) -> list[dict]:
    """auto's images per candidate at start (probed, cached or FLOP-scaled from a probed one) against the
    images the grid's runs of that shape saw at that budget (mean of seeds): where its speed model errs."""
    out = []
    for r in auto:
        for c in r.get("candidates", []):
            cell = means.get(r["budget"], {}).get(c["shape"])
            if cell is not None and c.get("images"):
                out.append({"budget": r["budget"], "seed": r["seed"], "shape": c["shape"],
                            "speed_from": c["speed_from"], "auto_images": int(c["images"]),
                            "grid_images": cell["images"], "ratio": c["images"] / cell["images"]})
    return out


def growth_check(grown: list[dict], control: list[dict], means: dict, budgets, grid_law: dict | None) -> list[dict]:
    """Per budget: each grown shape's measured mean top-1 against the grid's best fixed shape, the grid's run of
    the shape it grows (fixed, full depth) and the same-batch controls; and the shipped cpu prior's forecast of
    each growing run from its measured images (its term fitted on the older growth study, not on these runs); and the credit per shallow image each run needs under `grid_law`
    (the grid's law, all five parameters free, fitted on every budget)."""
    prior = load_prior("cpu")
    gm, cm = grid_means(grown), grid_means(control)
    out = []
    for b, _ in budgets:
        cells = means.get(b, {})
        best = max(cells, key=lambda s: cells[s]["top1"]) if cells else None
        for shape, c in sorted(gm.get(b, {}).items()):
            runs = [r for r in grown if r["budget"] == b and r["shape"] == shape]
            fc = [prior.predict(r["params"], prior.effective_images(r["images"], r["images_shallow"], r["depth"]))
                  for r in runs]
            fixed_shape = shape.removesuffix("+grow")
            out.append({"budget": b, "shape": shape, "seeds": c["seeds"], "top1": c["top1"], "images": c["images"],
                        "shallow_share": _mean([sum(r["images_shallow"].values()) / r["images"] for r in runs]),
                        "run_credits": [run_credit(grid_law, r) for r in runs] if grid_law else None,
                        "grid_best": best, "grid_best_top1": cells[best]["top1"] if best else None,
                        "vs_grid_best": c["top1"] - cells[best]["top1"] if best else None,
                        "grid_fixed_top1": cells.get(fixed_shape, {}).get("top1"),
                        "controls": {s: cc["top1"] for s, cc in cm.get(b, {}).items()},
                        "prior_forecast": _mean(fc), "prior_error": _mean(fc) - c["top1"]})
    return out


def table_md(ev: dict) -> str:
    budgets = [b for b, _ in ev["budgets"]]
    lines = []
    for key, title in (("lobo", f"alpha held at the gpu prior's {ev['alpha_fixed']:.4g} (set before the runs, as "
                                "the pilot and the cpu prior)"),
                       ("lobo_free", "all five parameters free (as `fastvit-sweep --fit-scaling` fits)"),
                       ("lobo_grow", "all five free, and the grown shapes beside the fixed ones (growth term c "
                                     "fitted on the other budgets' growing runs; best and regret over both)"),
                       ("lobo_const", "as above, the grown shapes at one credit per shallow image (the form "
                                      "first tried)")):
        if not ev.get(key):
            continue
        lines += [f"## Leave-one-budget-out picks: {title}", "",
                  "| budget | law fitted on | law | growth c (or one credit) | pick | forecast | measured | best | best top-1 | "
                  "regret | most-images pick (regret) |", "|---|---|---|---:|---|---:|---:|---|---:|---:|---|"]
        for r in ev[key]:
            if "refused" in r:
                lines.append(f"| {r['budget']} | {', '.join(r['fitted_on'])} | refused: {r['refused']} | | | | | | | | |")
                continue
            term = f"c {r['c']:.2f}" if r.get("c") is not None else \
                f"credit {r['credit']:.2f}" if r.get("credit") is not None else "–"
            lines.append(f"| {r['budget']} | {', '.join(r['fitted_on'])} | {r['law'].split(' (')[0]} | {term} | {r['pick']} | "
                         f"{r['forecast_top1']:.2f} | {r['measured_top1']:.2f} | {r['best']} | {r['best_top1']:.2f} | "
                         f"**{r['regret']:.2f}** | {r['most_images_pick']} ({r['most_images_regret']:.2f}) |")
        lines.append("")
    if ev.get("growth"):
        ctl = sorted({s for r in ev["growth"] for s in r["controls"]})
        lines += ["## Growing runs (`--growth manual`) against the fixed shapes", "",
                  "| budget | grown shape | top-1 (seeds) | images (shallow share) | grid's fixed run of it | grid best "
                  "| grown − grid best | " + " | ".join(f"same-batch {s}" for s in ctl)
                  + " | credit per shallow image (seeds) | cpu prior forecast (error) |",
                  "|---|---|---:|---:|---:|---|---:|" + "---:|" * len(ctl) + "---:|---:|"]
        for r in ev["growth"]:
            seeds = " / ".join(f"{x:.1f}" for x in r["seeds"])
            fixed_top = "–" if r["grid_fixed_top1"] is None else f"{r['grid_fixed_top1']:.2f}"
            lines.append(f"| {r['budget']} | {r['shape']} | {r['top1']:.2f} ({seeds}) | {r['images']:,.0f} "
                         f"({r['shallow_share']:.0%}) | {fixed_top} | {r['grid_best']} {r['grid_best_top1']:.2f} | "
                         f"**{r['vs_grid_best']:+.2f}** | "
                         + " | ".join("–" if s not in r["controls"] else f"{r['controls'][s]:.2f}" for s in ctl)
                         + " | " + (" / ".join(f"{x:.2f}" for x in r["run_credits"]) if r["run_credits"] else "–")
                         + f" | {r['prior_forecast']:.2f} ({r['prior_error']:+.2f}) |")
        lines.append("")
    lines += ["## `--model auto` end to end against the `cpu` preset (2 seeds each)", "",
              "| budget | auto's pick per seed | auto top-1 (seeds) | auto forecast | preset top-1 (seeds) | "
              "auto − preset |", "|---|---|---:|---:|---:|---:|"]
    for r in ev["auto_vs_preset"]:
        seeds = " / ".join(f"{x:.2f}" for x in r["auto_seeds"])
        pseeds = " / ".join(f"{x:.2f}" for x in r["preset_seeds"])
        fc = " / ".join("–" if x is None else f"{x:.1f}" for x in r["auto_predicted"])
        lines.append(f"| {r['budget']} | {', '.join(map(str, r['auto_picks']))} | {r['auto_top1']:.2f} ({seeds}) | "
                     f"{fc} | {r['preset_top1']:.2f} ({pseeds}) | **{r['margin']:+.2f}** |")
    if ev.get("speed_check"):
        lines += ["", "## auto's images per candidate at start against the grid's runs of that shape", "",
                  "| budget | shape | speed from | auto's images (seeds) | grid's images (mean) | ratio |",
                  "|---|---|---|---:|---:|---:|"]
        cells: dict = {}
        for r in ev["speed_check"]:
            cells.setdefault((r["budget"], r["shape"]), []).append(r)
        for (b, shape), rs in cells.items():
            seen = " / ".join(format(r["auto_images"], ",") for r in rs)
            lines.append(f"| {b} | {shape} | {', '.join(sorted({r['speed_from'] for r in rs}))} | "
                         f"{seen} | {rs[0]['grid_images']:,.0f} | "
                         f"{statistics.fmean(r['ratio'] for r in rs):.2f} |")
    lines += ["", "## The grid: mean top-1 (seeds) and mean images seen", "",
              "| shape | params | " + " | ".join(budgets) + " |", "|---|---:|" + "---:|" * len(budgets)]
    shapes = sorted({s for cells in ev["grid"].values() for s in cells},
                    key=lambda s: ev["grid"][budgets[0]][s]["params"])
    for s in shapes:
        cells = []
        for b in budgets:
            c = ev["grid"].get(b, {}).get(s)
            cells.append("–" if c is None else f"{c['top1']:.2f} ({' / '.join(f'{x:.1f}' for x in c['seeds'])}); "
                                               f"{c['images']:,.0f} img")
        name = f"{s} (the `cpu` preset)" if s == ev["preset_shape"] else s
        lines.append(f"| {name} | {ev['grid'][budgets[0]][s]['params']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(ev: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    budgets = ev["budgets"]
    mins = [s / 60 for _, s in budgets]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in sorted({s for cells in ev["grid"].values() for s in cells}):
        ys = [ev["grid"][b][s]["top1"] if s in ev["grid"].get(b, {}) else float("nan") for b, _ in budgets]
        line, = ax.plot(mins, ys, marker="o", label=s + (" (cpu preset)" if s == ev["preset_shape"] else ""))
        for m, (b, _) in zip(mins, budgets):
            for y in ev["grid"].get(b, {}).get(s, {}).get("seeds", []):
                ax.scatter([m], [y], s=8, color=line.get_color(), alpha=0.5)
    for s in sorted({r["shape"] for r in ev.get("growth", [])}):
        pts = [(next(sec for b, sec in budgets if b == r["budget"]) / 60, r["top1"]) for r in ev["growth"]
               if r["shape"] == s]
        ax.plot([m for m, _ in pts], [y for _, y in pts], marker="^", ls=":", label=f"{s} (--growth manual)")
    av = ev["auto_vs_preset"]
    if av:
        am = [next(s for b, s in budgets if b == r["budget"]) / 60 for r in av]
        ax.plot(am, [r["auto_top1"] for r in av], color="k", lw=2, ls="--", marker="*", ms=12,
                label="--model auto (end to end)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(mins, [b for b, _ in budgets])
    ax.set_xlabel("budget (wall clock)")
    ax.set_ylabel("top-1 % (Imagenette val)")
    ax.set_title("shapes at each budget (mean of seeds)")
    ax.legend(fontsize=7)
    for r in ev["lobo"]:
        if "refused" in r:
            continue
        xs = [c["measured_top1"] for c in r["ranking"]]
        ys = [c["forecast_top1"] for c in r["ranking"]]
        bx.scatter(xs, ys, label=f"{r['budget']} held out (pick {r['pick']})")
    lo = min(min(c["measured_top1"], c["forecast_top1"]) for r in ev["lobo"] if "refused" not in r
             for c in r["ranking"])
    hi = max(max(c["measured_top1"], c["forecast_top1"]) for r in ev["lobo"] if "refused" not in r
             for c in r["ranking"])
    bx.plot([lo, hi], [lo, hi], color="grey", lw=1)
    bx.set_xlabel("measured top-1 % (mean of seeds)")
    bx.set_ylabel("forecast top-1 % (law without that budget)")
    bx.set_title("leave-one-budget-out forecasts")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def copy_runs(rows: list[dict], sweep: Path, out: Path) -> int:
    """Each run's results.json and plan.json copied to out/runs/<its path under the sweep's runs/>; the row's
    run_dir becomes that copy's path relative to `out` (the committed copy, not the scratch dir)."""
    n = 0
    for r in rows:
        src = Path(r["run_dir"])
        rel = Path("runs") / (src.relative_to(sweep / "runs") if src.is_relative_to(sweep / "runs") else src.name)
        (out / rel).mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "plan.json"):
            if (src / name).is_file():
                shutil.copyfile(src / name, out / rel / name)
                n += 1
        r["run_dir"] = str(rel)
    return n


def _grid_law(grid: list[dict]) -> dict | None:
    try:
        return fit_law([_point(r) for r in grid], loo=False).params
    except ScalingError:
        return None


def evidence(sweep: Path, preset_shape: str, classes: int, growth_sweep: Path | None = None) -> dict:
    rows = read_runs(sweep, classes)
    grid = [r for r in rows if r["variant"] != AUTO_VARIANT and "images_shallow" not in r]
    auto = [r for r in rows if r["variant"] == AUTO_VARIANT]
    more = read_runs(growth_sweep, classes) if growth_sweep else []
    grown = [r for r in rows + more if "images_shallow" in r]
    control = [r for r in more if "images_shallow" not in r and r["variant"] != AUTO_VARIANT]
    budgets = sorted({(r["budget"], r["budget_s"]) for r in rows}, key=lambda b: b[1])
    means = grid_means(grid)
    alpha = load_prior("gpu").params["alpha"]
    for r in more:
        r["sweep"] = "growth"
    return {"sweep": str(sweep), "growth_sweep": str(growth_sweep) if growth_sweep else None, "classes": classes,
            "preset_shape": preset_shape, "alpha_fixed": alpha,
            "budgets": budgets, "grid": means, "lobo": lobo(grid, budgets, {"alpha": alpha}, means),
            "lobo_free": lobo(grid, budgets, {}, means),
            "lobo_grow": lobo(grid, budgets, {}, means, grown) if grown else [],
            "lobo_const": lobo(grid, budgets, {}, means, grown, const=True) if grown else [],
            "growth": growth_check(grown, control, means, budgets, _grid_law(grid)) if grown else [],
            "auto_vs_preset": auto_vs_preset(auto, means, budgets, preset_shape),
            "speed_check": speed_check(auto, means), "runs": rows + more}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", required=True, help="fastvit-sweep output dir (sweep.csv, runs/)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "auto"))
    ap.add_argument("--preset-shape", default="d4-w192", help="the cpu preset's shape in the grid")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--growth-sweep", help="a second fastvit-sweep dir with fastvit+shape=<shape>+growth=manual "
                    "variants (and fixed-shape controls): growth as a candidate")
    a = ap.parse_args(argv)
    sweep, out = Path(a.sweep), Path(a.out)
    growth_sweep = Path(a.growth_sweep) if a.growth_sweep else None
    for d in (sweep, growth_sweep):
        if d is not None and not (d / "sweep.csv").is_file():
            print(f"auto_evidence: {d} has no sweep.csv (a fastvit-sweep output dir)", file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    ev = evidence(sweep, a.preset_shape, a.classes, growth_sweep)
    if not ev["grid"]:
        print(f"auto_evidence: {sweep} has no finished grid run (variants fastvit+shape=...)", file=sys.stderr)
        return 2
    n = copy_runs([r for r in ev["runs"] if r.get("sweep") != "growth"], sweep, out)
    if growth_sweep:
        grown_rows = [r for r in ev["runs"] if r.get("sweep") == "growth"]
        n += copy_runs(grown_rows, growth_sweep, out / "growth")
        for r in grown_rows:
            r["run_dir"] = str(Path("growth") / r["run_dir"])
    (out / "evidence.json").write_text(json.dumps(ev, indent=1, default=float) + "\n")
    (out / "table.md").write_text(table_md(ev))
    png = plot(ev, out / "auto.png")
    print(table_md(ev))
    print(f"auto_evidence: wrote {out}/evidence.json, table.md{', auto.png' if png else ''} and {n} run files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
