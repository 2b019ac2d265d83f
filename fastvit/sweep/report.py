"""A sweep's files: sweep.csv (one row per run), table.md (mean ± sd top-1 per variant and budget),
top1_vs_budget.png (log x), and the BNSL forecast (forecast.md / forecast.json / forecast.png)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from fastvit.forecast import bnsl
from fastvit.forecast.sweep_csv import COLUMNS, read_csv, write_csv  # noqa: F401 (the sweep's file)


def _x(r: dict) -> float:
    """A run's budget on the x axis: its wall-clock budget, else (image budgets) its images seen."""
    return r["budget_s"] if r.get("budget_s") else r["images_seen"]


def _order(rows, key):
    seen = []
    for r in rows:
        if r[key] not in seen:
            seen.append(r[key])
    return seen


def _grid(rows: list[dict], cell) -> str:
    """Markdown: one row per variant, one column per budget, cell(values of its runs) in each."""
    budgets = sorted(_order(rows, "budget"), key=lambda b: min(_x(r) for r in rows if r["budget"] == b))
    lines = ["| variant | " + " | ".join(budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for v in _order(rows, "variant"):
        runs = [[r for r in rows if r["variant"] == v and r["budget"] == b] for b in budgets]
        lines.append(f"| {v} | " + " | ".join(cell(rs) if rs else "–" for rs in runs) + " |")
    return "\n".join(lines) + "\n"


def table(rows: list[dict]) -> str:
    """Markdown: one row per variant, one column per budget, mean ± sd of top-1 (%) over seeds (n)."""
    def cell(rs):
        t = [r["top1"] for r in rs]
        return f"{t[0]:.2f}" if len(t) == 1 else f"{statistics.mean(t):.2f} ± {statistics.stdev(t):.2f} (n={len(t)})"

    return _grid(rows, cell)


def images_table(rows: list[dict]) -> str:
    """Markdown: training images each run saw (mean over seeds): at an equal time budget, top-1 is as much
    about how many images a variant gets through as about what it learns from each."""
    return _grid(rows, lambda rs: f"{statistics.mean(r['images_seen'] for r in rs):,.0f}")


def plot(rows: list[dict], path: Path, forecasts: dict | None = None) -> None:
    """Top-1 against budget per variant (log x): runs as points, mean as a line; with forecasts, each
    variant's BNSL fit (dashed) and its forecast with the interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, v in enumerate(_order(rows, "variant")):
        c = f"C{i % 10}"                 # past ten variants the colours repeat with another line and marker
        rv = [r for r in rows if r["variant"] == v]
        xs = sorted({_x(r) for r in rv})
        ax.plot([_x(r) for r in rv], [r["top1"] for r in rv], "os^"[i // 10 % 3], color=c, alpha=0.6)
        ax.plot(xs, [statistics.mean(r["top1"] for r in rv if _x(r) == x) for x in xs], "-" if i < 10 else "-.",
                color=c, label=v)
        fc = (forecasts or {}).get(v)
        if fc and "seconds" in fc and "fit" in fc["seconds"]:
            f = fc["seconds"]
            fit = bnsl.Fit(**f["fit"])
            grid = np.geomspace(fit.x_min, f["x_target"], 100)
            ax.plot(grid, 100 * (1 - fit.predict(grid)), "--", color=c, lw=1)
            y = 100 * (1 - f["y"])
            err = None if f["lo"] is None else [[y - 100 * (1 - f["hi"])], [100 * (1 - f["lo"]) - y]]
            ax.errorbar([f["x_target"]], [y], yerr=err, fmt="*", color=c, ms=10, capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("budget (counted seconds)" if all(r.get("budget_s") for r in rows) else "budget")
    ax.set_ylabel("top-1 (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(rows: list[dict], out: Path) -> None:
    write_csv(rows, out / "sweep.csv")
    (out / "table.md").write_text("Top-1 (%), mean ± sd over seeds (n):\n\n" + table(rows)
                                  + "\nTraining images seen per run (mean over seeds):\n\n" + images_table(rows))
    if rows:
        plot(rows, out / "top1_vs_budget.png")


def wsd_md(rows: list[dict], saving: dict, share: float) -> str:
    """WSD points against independent runs of the same (variant, budget) where both exist, and the saving."""
    u = saving["unit"]
    lines = [f"Warmup-stable-decay: a constant-LR trunk per (variant, seed), a linear decay branch of {share:.0%} of "
             f"each budget. Planned budget: {saving['wsd_budget']:g} {u} against {saving['independent_budget']:g} {u} "
             f"for independent runs of the same points (saving {saving['saving']:.0%}); counted so far "
             f"{saving['wsd_counted_s']:.0f} s.", "",
             "Top-1 (%) as mean ± sd over seeds (n); the last column is the independent runs' own seed spread "
             "(max − min), the noise a WSD point's difference is to be read against.", "",
             "| variant | budget | independent top-1 | WSD top-1 | WSD − independent | independent seed spread |",
             "|---|---|---:|---:|---:|---:|"]

    def ms(v):
        return f"{statistics.mean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else "") + f" ({len(v)})"

    for v in [x for x in _order(rows, "variant") if x.endswith(" (wsd)")]:
        base = v[: -len(" (wsd)")]
        for b in _order([r for r in rows if r["variant"] == v], "budget"):
            w = [r["top1"] for r in rows if r["variant"] == v and r["budget"] == b]
            i = [r["top1"] for r in rows if r["variant"] == base and r["budget"] == b]
            iv = ms(i) if i else "–"
            d = f"{statistics.mean(w) - statistics.mean(i):+.2f}" if i else "–"
            spread = f"{max(i) - min(i):.2f}" if len(i) > 1 else "–"
            lines.append(f"| {base} | {b} | {iv} | {ms(w)} | {d} | {spread} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------
# forecast

def forecast_variant(rows: list[dict], target_s: float, *, breaks="auto", max_factor=bnsl.DEFAULT_MAX_FACTOR,
                     n_boot: int = 20) -> dict:
    """BNSL on error = 1 − top-1 against budget seconds and against images seen, forecast at target_s
    (images: target_s × the images/s of the largest budget's runs), and the held-out-largest error.
    A refusal or an impossible fit is kept as {'refused': line}."""
    rv = [r for r in rows if r.get("budget_s")]
    if not rv:
        return {"refused": "forecasts need wall-clock budgets (s, m, h)"}
    err = np.array([1 - r["top1"] / 100 for r in rv])
    secs = np.array([r["budget_s"] for r in rv])
    imgs = np.array([r["images_seen"] for r in rv], dtype=float)
    seeds = np.array([r["seed"] for r in rv])
    top = secs.max()
    ips = float(np.median(imgs[secs == top] / secs[secs == top]))
    out: dict = {"images_per_s": ips}
    for axis, x, target in (("seconds", secs, target_s), ("images", imgs, target_s * ips)):
        res: dict = {}
        try:
            res.update(bnsl.forecast(x, err, target, breaks=breaks, max_factor=max_factor, groups=seeds,
                                     n_boot=n_boot))
        except bnsl.BNSLError as e:
            res["refused"] = str(e)
        try:
            hx = secs if axis == "seconds" else imgs
            if axis == "images":   # hold out the largest budget's runs (their images differ per seed)
                keep = secs < top
                fit = bnsl.fit_bnsl(hx[keep], err[keep], breaks=breaks)
                pred = fit.predict(hx[~keep])
                res["holdout"] = {"x": float(np.mean(hx[~keep])), "pred": float(np.mean(pred)),
                                  "measured": float(np.mean(err[~keep])), "rmsle": bnsl.rmsle(pred, err[~keep]),
                                  "fit": fit.to_dict()}
            else:
                res["holdout"] = bnsl.holdout_error(hx, err, breaks=breaks)
        except bnsl.BNSLError as e:
            res["holdout"] = {"refused": str(e)}
        out[axis] = res
    return out


def forecast_all(rows: list[dict], target_s: float, **kw) -> dict:
    return {v: forecast_variant([r for r in rows if r["variant"] == v], target_s, **kw)
            for v in _order(rows, "variant")}


def _pct(e):
    return f"{100 * (1 - e):.2f}"


def forecast_md(fc: dict, target_label: str) -> str:
    lines = [f"BNSL forecast of top-1 (%) at {target_label}, fitted to error = 1 − top-1; interval: min–max over "
             "the full fit, leave-one-budget-out refits and a bootstrap over seeds.",
             "Held out: the fit without the largest budget, predicting it (RMSLE of the error, log y).", "",
             "| variant | axis | breaks | forecast | interval | held-out budget: predicted | measured | RMSLE |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for v, f in fc.items():
        if "refused" in f:
            lines.append(f"| {v} | – | – | refused: {f['refused']} | | | | |")
            continue
        for axis in ("seconds", "images"):
            a = f[axis]
            if "refused" in a:
                cells = [f"refused: {a['refused']}", ""]
                br = "–"
            else:
                br = str(a["fit"]["breaks"])
                iv = "–" if a["lo"] is None else f"{_pct(a['hi'])}–{_pct(a['lo'])}"
                cells = [_pct(a["y"]), iv]
            h = a["holdout"]
            hc = [f"refused: {h['refused']}", "", ""] if "refused" in h else \
                [_pct(h["pred"]), _pct(h["measured"]), f"{h['rmsle']:.3f}"]
            lines.append(f"| {v} | {axis} | {br} | " + " | ".join(cells + hc) + " |")
    return "\n".join(lines) + "\n"


def write_forecast(rows: list[dict], out: Path, target_s: float, target_label: str, **kw) -> dict:
    fc = forecast_all(rows, target_s, **kw)
    (out / "forecast.json").write_text(json.dumps({"target_s": target_s, "target": target_label, "variants": fc},
                                                  indent=1))
    (out / "forecast.md").write_text(forecast_md(fc, target_label))
    plot(rows, out / "forecast.png", forecasts=fc)
    return fc
