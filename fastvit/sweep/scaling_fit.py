"""`fastvit-sweep --fit-scaling`: the joint scaling law (fastvit.scaling) fitted on a sweep's runs.

Each finished independent run is a point: N = its model's parameters (results.json's `params` where the run
wrote one, else counted from the variant's resolved model config), D = its images_seen, its top-1, its budget
(the unit left out in leave-one-budget-out) and its seed. Runs of one recipe crossed with shapes (`--shapes`,
or variants `...+shape=d4-w192`) make one law: `scaling.json`; several recipes make one law each,
`scaling-<recipe>.json`. Beside each, `scaling.md`: the law, its leave-one-budget-out error per budget and
the points. A fit the points cannot determine is one line, not a failure of the sweep.

Growing runs (--growth manual: variants `...+growth=manual` or `growth`) belong to their recipe's law but not
to its fixed-size fit: after the law, they fit its growth term (fastvit.scaling.fit_growth: c, what an image
seen at a shallower depth is worth), each with the images its results.json stages saw at each depth below the
final one. AutoProg runs (--growth auto: the depth is decided during the run) are left out.
"""
from __future__ import annotations

import json
from pathlib import Path

from fastvit.models.configs import model_config
from fastvit.models.shapes import grow_label, param_count, parse_shape, shape_name
from fastvit.scaling import ScalingError, fit_growth, fit_law, save_law
from fastvit.stage import shallow_images
from fastvit.train.config import make_config

from .runner import slug

SHAPE_KEY = "shape="
GROWTH_PARTS = ("growth", "growth=manual", "growth=auto", "growth=none")   # label parts that set the growth mode


def split_shape(label: str) -> tuple[str, str | None]:
    """'fastvit+shape=d2-w192' → ('fastvit', 'd2-w192'); a label without a shape part → (label, None)."""
    parts = label.split("+")
    shapes = [p[len(SHAPE_KEY):] for p in parts if p.startswith(SHAPE_KEY)]
    rest = [p for p in parts if not p.startswith(SHAPE_KEY)]
    return "+".join(rest) or "fastvit", (shapes[-1] if shapes else None)


def run_model(overrides: dict, preset: str, data_res: list[int]) -> dict:
    """The shape, patch, locality and eval resolution a variant's runs train (their resolved config)."""
    cfg = make_config(preset, overrides)
    vit = model_config(cfg.model.name, **cfg.model.overrides())
    return {"shape": shape_name({"depth": vit.depth, "embed_dim": vit.embed_dim, "num_heads": vit.num_heads,
                                 "mlp_ratio": vit.mlp_ratio}),
            "patch_size": vit.patch_size, "local": vit.local, "res": cfg.data.final_res or max(data_res),
            "growth": cfg.growth.mode}


def recipe_of(label: str) -> str:
    """The law a variant's runs belong to: its label less the shape and growth parts
    ('fastvit+shape=d4-w128+growth=manual' → 'fastvit')."""
    rest, _ = split_shape(label)
    return "+".join(p for p in rest.split("+") if p not in GROWTH_PARTS) or "fastvit"


def images_shallow(results: dict, full_depth: int) -> dict:
    """{depth k: images} a growing run saw at each depth below its final one (its results.json stages: steps ×
    batch); {} when results.json has no stages or the run never trained shallow."""
    return shallow_images([(s.get("depth"), s["steps"], s["batch_size"]) for s in results.get("stages") or ()],
                          full_depth)


def sweep_points(rows: list[dict], per_variant: dict, preset: str, classes: int, data_res: list[int],
                 say=print) -> dict:
    """{recipe: {"fixed": [point, ...], "growth": [point with depth, images_shallow, ...]}} from the sweep's rows (WSD
    rows left out: their D spans several runs; --growth auto runs too: their depth is the run's decision)."""
    out: dict = {}
    models: dict = {}
    for r in rows:
        if r["variant"] not in per_variant:             # '<variant> (wsd)' rows
            continue
        m = models.setdefault(r["variant"], run_model(per_variant[r["variant"]], preset, data_res))
        if m["growth"] == "auto":
            continue
        res = {}
        path = Path(r.get("run_dir") or "") / "results.json"
        if path.is_file():
            res = json.loads(path.read_text())
        n = res.get("params") or param_count(m["shape"], classes, m["patch_size"], m["local"])
        point = {"shape": m["shape"], "params": int(n), "images": int(r["images_seen"]), "top1": float(r["top1"]),
                 "budget": r["budget"], "seed": int(r["seed"]), "res": res.get("eval_res", m["res"]),
                 "source": r.get("run_dir")}
        group = out.setdefault(recipe_of(r["variant"]), {"fixed": [], "growth": []})
        if m["growth"] == "manual":
            depth = parse_shape(m["shape"])["depth"]
            shallow = images_shallow(res, depth)
            if shallow:
                group["growth"].append({**point, "shape": grow_label(m["shape"]), "depth": depth,
                                        "images_shallow": shallow})
            else:
                say(f"fastvit-sweep: {r.get('run_dir')}: a --growth manual run whose results.json shows no stage "
                    "below its final depth (missing, or it never grew): left out of the growth term")
            continue
        group["fixed"].append(point)
    return out


def law_md(law, recipe: str) -> str:
    lo = law.loo
    lines = [f"Scaling law of {recipe}: {law.describe()}", "",
             f"err = 1 − top-1; N = parameters, D = training images seen; fitted on {len(law.points)} runs "
             f"(N {law.n_range[0]:,.0f}–{law.n_range[1]:,.0f}, D {law.d_range[0]:,.0f}–{law.d_range[1]:,.0f}); "
             f"fit RMSE {law.fit_info['rmse_top1']:.2f} top-1 points.",
             "Leave-one-budget-out: the law refitted without a budget's runs, predicting them (top-1 points, "
             "predicted − measured; 'held': parameters the other budgets could not determine, kept at the full fit's)."
             f" Overall RMSE: {'–' if lo.get('rmse') is None else format(lo['rmse'], '.2f')}.", "",
             "| left out | runs | RMSE | mean error | max abs | held |", "|---|---:|---:|---:|---:|---|"]
    for b in lo.get("by_budget", []):
        if "refused" in b:
            lines.append(f"| {b['budget']} | {b['n']} | refused: {b['refused']} | | | |")
        else:
            lines.append(f"| {b['budget']} | {b['n']} | {b['rmse']:.2f} | {b['mean_error']:+.2f} | "
                         f"{b['max_abs']:.2f} | {', '.join(b['held']) or '–'} |")
    lines += ["", "| shape | params | budget | seed | images seen | top-1 | law |", "|---|---:|---|---:|---:|---:|---:|"]
    for p in sorted(law.points, key=lambda p: (p["params"], p["images"])):
        lines.append(f"| {p['shape']} | {p['params']:,} | {p['budget']} | {p.get('seed', '')} | {p['images']:,} | "
                     f"{p['top1']:.2f} | {law.predict(p['params'], p['images']):.2f} |")
    return "\n".join(lines + growth_md(law)) + "\n"


def growth_md(law) -> list[str]:
    """scaling.md's growth section: c, its leave-one-budget-out error, the growing runs ([] without a term)."""
    g = law.growth
    if not g:
        return []
    lo = g["loo"]
    lines = ["", f"Growth term: c = {g['c']:.3f} ({g['form']}); fitted on {g['fit']['n_points']} growing "
             f"runs, RMSE {g['fit']['rmse_top1']:.2f} top-1 points. Leave-one-budget-out (c refitted without a "
             f"budget's growing runs, under the law refitted without it): RMSE "
             f"{'–' if lo.get('rmse') is None else format(lo['rmse'], '.2f')}.", "",
             "| left out | runs | c | RMSE | mean error |", "|---|---:|---:|---:|---:|"]
    for b in lo["by_budget"]:
        lines.append(f"| {b['budget']} | {b['n']} | refused: {b['refused']} | | |" if "refused" in b else
                     f"| {b['budget']} | {b['n']} | {b['c']:.3f} | {b['rmse']:.2f} | {b['mean_error']:+.2f} |")
    lines += ["", "| grown shape | params | budget | seed | images seen | of them shallower | top-1 | law |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    for p in sorted(g["points"], key=lambda p: (p["params"], p["images"])):
        d_eff = law.effective_images(p["images"], p["images_shallow"], p["depth"])
        lines.append(f"| {p['shape']} | {p['params']:,} | {p['budget']} | {p.get('seed', '')} | {p['images']:,} | "
                     f"{', '.join(f'{v:,} at d{k}' for k, v in p['images_shallow'].items())} | {p['top1']:.2f} | "
                     f"{law.predict(p['params'], d_eff):.2f} |")
    return lines


def write_scaling(rows: list[dict], out: Path, per_variant: dict, preset: str, data: str, classes: int,
                  data_res: list[int], say=print) -> list[Path]:
    """Fit and write scaling.json (+ scaling.md) per recipe; a refused fit is said in one line. Returns the
    files written."""
    written = []
    groups = sweep_points(rows, per_variant, preset, classes, data_res, say)
    for recipe, group in groups.items():
        pts, grown = group["fixed"], group["growth"]
        name = "scaling" if len(groups) == 1 else f"scaling-{slug(recipe)}"
        resolutions = sorted({p["res"] for p in pts + grown})
        try:
            law = fit_law(pts, data={"name": str(data), "classes": classes, "resolution": resolutions[-1]},
                          provenance=f"fastvit-sweep --fit-scaling: {len(pts)} runs of {recipe} "
                                     f"(preset {preset}) on {data}")
        except ScalingError as e:
            say(f"fastvit-sweep: scaling fit of {recipe} refused: {e}")
            continue
        if grown:
            try:
                law = fit_growth(law, grown, provenance=f"fastvit-sweep --fit-scaling: {len(grown)} growing runs "
                                                        f"(--growth manual) of {recipe} on {data}")
            except ScalingError as e:
                say(f"fastvit-sweep: growth term of {recipe} refused: {e}")
        written.append(save_law(law, out / f"{name}.json"))
        (out / f"{name}.md").write_text(law_md(law, recipe))
        written.append(out / f"{name}.md")
    return written
