"""`fastvit-search`: which ViT to train for a budget on this machine, without training any.

    fastvit-search --data OUT --hours 24 [--device cuda|cpu] [--out DIR]
    fastvit-train --config DIR/best.yaml          # the chosen net, budget and data

For every candidate of the space (depth × width × heads × MLP ratio × patch × locality): As-ViT's
training-free κ (NTK condition number) and L (length distortion) at initialisation on training images
of the prepped shards (fastvit.search.measures), and its measured training speed at the stages
fastvit-train would plan (fastvit.search.probe) -> the images it would see in the budget. Candidates
that cannot see --min-epochs epochs are dropped; the rest are ranked (--rank) by

- law: the top-1 the scaling law (fastvit.scaling: err = E + A/N^alpha + B/D^beta, --scaling FILE or the
  shipped prior of the device) predicts from the net's parameters and its images in the budget. On
  Imagenette the images a run saw ranked the nets' top-1 with Kendall τ 0.91, κ and L with 0.24
  (bench/results/search); the law turns images and size into one forecast (τ 0.87 out of sample at the
  images seen, but 0.07 at images probed under another load: tau_law.md);
- asvit (the default: the best training-free τ measured, tau_law.md): As-ViT's rank sum (κ ascending, L
  descending, plus --speed-weight × images in budget descending),

and the best is grown As-ViT's way (+0/+1 block × width +0..20 %; the best proposal by the same ranking, and
with the law only while the forecast improves) while the grown net still fits. κ, L and the law's forecast
are reported for every net whichever ranks.

Writes DIR/candidates/<key>.json (one per measured net; a rerun reuses them: resumable), DIR/table.md,
DIR/search.json and DIR/best.yaml (a config fastvit-train --config takes). Errors are one line
(exit 2 usage, 1 runtime), Ctrl-C exits 130 with every finished candidate kept.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from fastvit.fileio import write_bytes_atomic, write_json_atomic
from fastvit.scaling import INTERVAL_METHOD

from . import rank
from .space import Candidate, grow_proposals, search_space

# spaces per preset: CPU-sized nets for the cpu preset (final res 96), DeiT-sized for the gpu preset
# (18 and 24 nets: each costs 5 inits × (16 backward passes + one jvp) plus a probe of its stages)
SPACES = {
    "cpu": dict(depths="2,4,6", widths="128,192,256", heads="4", mlp_ratios="4", patches="16", locality="on,off"),
    "gpu": dict(depths="6,9,12", widths="192,288,384,480", heads="6", mlp_ratios="4", patches="16", locality="on,off"),
}
MIN_EPOCHS = {"cpu": 1.0, "gpu": 10.0, "test": 1.0}   # a "sensible number of images": epochs of the train split
# what the ranking is worth, said with every result (the tool claims no more than its evidence)
EVIDENCE = {
    "law": ("note: ranked by the scaling law's forecast from parameters and probed images in budget. On Imagenette "
            "CPU runs (10 nets, 2 min; bench/results/search/tau_law.md) the law ranked top-1 with Kendall τ 0.87 at the "
            "images the runs saw, but 0.07 at the probe's images (the probe ran under another load than training), "
            "κ+L 0.25: the forecast is only as good as the measured speed"),
    "asvit": ("note: on Imagenette CPU runs, κ and L did not predict accuracy (Kendall τ 0.25, p 0.32, 10 nets; "
              "bench/results/search/tau_law.md): the best of the training-free rankings measured (the law at probed "
              "images 0.07, κ+L+2·speed -0.16), which is not saying much; treat the ranking as a tie-break, not a forecast"),
}

# The default ranking follows the measured Kendall τ of bench/results/search/tau_law.md (10 Imagenette nets,
# 2-minute CPU budgets, every measure training-free except where said): κ+L's rank sum alone 0.25 (p 0.32), the
# scaling law at the probe's images 0.07, κ+L+1·speed 0.05, κ+L+2·speed -0.16 (the old default weight). The
# best training-free τ is κ+L alone, so the default is As-ViT's rank sum with the images-in-budget weight 0;
# none of them is significant, and the images a run really saw (not known before training) reach 0.91.
SPEED_WEIGHT = 0.0


class SearchError(Exception):
    def __init__(self, msg: str, code: int = 1):
        super().__init__(msg)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastvit-search", description="Rank ViT configs for a wall-clock budget "
                                "without training them (As-ViT's κ and L + measured speed) and write a "
                                "fastvit-train config for the best one.")
    a = p.add_argument
    a("--data", required=True, help="fastvit-prep output dir")
    a("--hours", type=float, required=True, help="the training budget the net is chosen for")
    a("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    a("--out", default="runs/search", help="search dir: candidates/, table.md, search.json, best.yaml")
    a("--preset", choices=("cpu", "gpu", "test"), help="fastvit-train preset the speeds are probed with (default: by device)")
    for name, what in (("depths", "blocks"), ("widths", "embed dims"), ("heads", "attention heads"),
                       ("mlp-ratios", "MLP ratios"), ("patches", "patch sizes"), ("locality", "on,off")):
        a(f"--{name}", help=f"comma list of {what} (default: the preset's space)")
    a("--min-epochs", type=float, help="drop candidates that see fewer epochs of the train split in the budget "
      "(default: 10 gpu, 1 cpu)")
    a("--grow-steps", type=int, default=3, help="As-ViT growth steps from the best candidate (0: none)")
    a("--rank", choices=("law", "asvit"), default="asvit", help="asvit (the default: the best measured training-free "
      "Kendall τ, bench/results/search/tau_law.md): As-ViT's rank sum of κ, L (and --speed-weight × images in budget); "
      "law: the scaling law's forecast of top-1 from parameters and probed images in budget")
    a("--scaling", metavar="FILE", help="scaling.json (fastvit-sweep --fit-scaling) for the forecast (default: the "
      "shipped prior, cpu or gpu by preset)")
    a("--speed-weight", type=float, default=SPEED_WEIGHT, help="asvit ranking: weight of the images-in-budget rank")
    a("--inits", type=int, default=5, help="fresh initialisations per measure")
    a("--seed", type=int, default=0, help="seed of the initialisations, the circle planes and the images")
    a("--compile", action="store_true", help="probe speeds with torch.compile (slower search, the trainer's speed on GPU)")
    a("--set", action="append", default=[], metavar="KEY=VALUE", help="a fastvit-train setting for the probes and best.yaml")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


# ------------------------------------------------------------------------------------------------------
# set-up

@dataclass
class Context:
    args: argparse.Namespace
    preset: str
    common: dict              # fastvit-train settings shared by every candidate (data, device, budget, --set)
    env: object               # fastvit.train.setup.RunEnv
    images: object            # (16,3,res,res) uint8 training images on the device
    fingerprint: dict         # what a candidate's result depends on (a file with another is re-measured)
    out: Path
    law: object = None        # fastvit.scaling.ScalingLaw: the forecast of every candidate
    law_warning: str | None = None   # the law was fitted on other data / another resolution (one line)

    @property
    def res(self) -> int:
        return self.env.final_res

    @property
    def budget_s(self) -> float:
        return self.args.hours * 3600.0


def _ints(text: str, flag: str, cast=int) -> list:
    try:
        vals = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SearchError(f"--{flag} {text!r}: expected a comma list of numbers", 2) from None
    if not vals:
        raise SearchError(f"--{flag} is empty", 2)
    return vals


def _locality(text: str) -> list[bool]:
    vals = [v.strip().lower() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in ("on", "off")]
    if bad or not vals:
        raise SearchError(f"--locality {text!r}: give on, off or on,off", 2)
    return [v == "on" for v in vals]


def candidates_from_args(args, preset: str, res: int) -> list[Candidate]:
    sp = {k: getattr(args, k) or v for k, v in SPACES.get(preset, SPACES["cpu"]).items()}
    cands = search_space(depths=_ints(sp["depths"], "depths"), widths=_ints(sp["widths"], "widths"),
                         heads=_ints(sp["heads"], "heads"), mlp_ratios=_ints(sp["mlp_ratios"], "mlp-ratios", float),
                         patches=_ints(sp["patches"], "patches"), locality=_locality(sp["locality"]), res=res)
    if not cands:
        raise SearchError(f"no valid candidate in the space at final resolution {res} (widths must be divisible "
                          f"by heads, patches must divide {res} and 224)", 2)
    return cands


def setup(args) -> Context:
    import torch

    from fastvit.data import make_loader
    from fastvit.data.dataset import DataError
    from fastvit.sweep.variants import parse_overrides
    from fastvit.train.config import ConfigError, make_config
    from fastvit.train.errors import TrainError
    from fastvit.train.setup import open_env, seed_everything

    if not args.hours > 0:
        raise SearchError("--hours must be positive", 2)
    if args.inits < 1:
        raise SearchError("--inits must be >= 1", 2)
    from fastvit.train.rules import preset_for_device

    preset = args.preset or preset_for_device(args.device)
    try:
        common = {**parse_overrides(args.set), "data": args.data, "hours": args.hours, "progress": False,
                  "compile": bool(args.compile)}
        if args.device:
            common["device"] = args.device
        cfg = make_config(preset, common)
        env = open_env(cfg)
    except (ConfigError, TrainError) as e:
        raise SearchError(str(e), getattr(e, "code", 2)) from None
    seed_everything(args.seed)
    try:
        loader = make_loader(env.source, split="train", res=env.final_res, batch_size=16, train=False,
                             seed=args.seed, workers=cfg.data.workers)
        try:
            images, _ = next(iter(loader))                                         # (16,3,res,res) uint8
        finally:
            loader.close()
    except (DataError, StopIteration) as e:
        raise SearchError(f"--data {args.data}: cannot read 16 training images at {env.final_res} px ({e})", 2) from None
    law, warning = load_scaling(args.scaling, preset, env.ds.num_classes, env.final_res)
    fingerprint = {"data": str(Path(args.data).resolve()), "res": env.final_res, "device": str(env.device),
                   "preset": preset, "inits": args.inits, "seed": args.seed, "compile": bool(args.compile),
                   "set": sorted(args.set), "torch": torch.__version__}
    return Context(args=args, preset=preset, common=common, env=env, images=images.to(env.device),
                   fingerprint=fingerprint, out=Path(args.out), law=law,
                   law_warning=warning)


def load_scaling(path: str | None, preset: str, classes: int, res: int):
    """The law of --scaling FILE, else the shipped prior of the preset's device (cpu for cpu/test, gpu else);
    returns (law, the one warning line when it was fitted on other data or another resolution, else None)."""
    from fastvit.scaling import ScalingError, load_law, load_prior

    try:
        law = load_law(path) if path else load_prior("gpu" if preset == "gpu" else "cpu")
    except ScalingError as e:
        raise SearchError(f"--scaling: {e}" if path else str(e), 2) from None
    return law, law.mismatch(classes, res)


# ------------------------------------------------------------------------------------------------------
# one candidate (measured once, cached in its file)

def _make_model(c: Candidate, num_classes: int, device):
    import torch

    from fastvit.models import create_model

    def make(seed: int):
        torch.manual_seed(seed)
        return create_model(c.model_name, num_classes=num_classes, **c.overrides()).to(device)
    return make


def measure_candidate(c: Candidate, ctx: Context) -> dict:
    """κ, L, parameters and probed speeds of `c`: from its file when measured with the same settings,
    else measured now and written (atomically) before returning."""
    from fastvit.train.config import make_config

    from . import measures, probe

    path = ctx.out / "candidates" / f"{c.key}.json"
    if path.is_file():
        try:
            d = json.loads(path.read_text())
            if d.get("fingerprint") == ctx.fingerprint:
                return d
        except (OSError, ValueError):
            pass                                              # unreadable: measured again
    n_cls = ctx.env.ds.num_classes
    m = measures.measure(_make_model(c, n_cls, ctx.env.device), ctx.images, ctx.res,
                         inits=ctx.args.inits, seed=ctx.args.seed)
    cfg = make_config(ctx.preset, {**ctx.common, "model": c.model_name, **c.overrides()})
    stages, speeds = probe.probe_speeds(cfg, ctx.env, n_cls)
    d = {"candidate": c.to_dict(), "key": c.key, "fingerprint": ctx.fingerprint,
         "kappa": m.kappa if math.isfinite(m.kappa) else None, "length": m.length, "params": m.params,
         "probe": probe.speeds_to_json(stages, speeds)}
    write_json_atomic(path, d)
    return d


def row(d: dict, ctx: Context, min_images: float) -> dict:
    """A measured candidate's numbers for this budget."""
    from . import probe

    stages, speeds = probe.speeds_from_json(d["probe"])
    images = probe.images_in_budget(stages, speeds, ctx.budget_s)
    from fastvit.train.rules import reserve_s

    window = ctx.budget_s - reserve_s(ctx.budget_s)
    kappa = d["kappa"] if d["kappa"] is not None else math.inf
    out = {"key": d["key"], "candidate": Candidate.from_dict(d["candidate"]), "kappa": kappa, "length": d["length"],
           "params": d["params"], "img_s": images / window, "images": images,
           "epochs": images / max(1, ctx.env.ds.count("train")), "fits": rank.fits(images, min_images)}
    if ctx.law is not None:
        from fastvit.scaling import choose

        (f,) = choose(ctx.law, [{"params": d["params"], "images": images}])
        out.update(predicted_top1=f["top1"], interval=f["interval"], extrapolates=f["extrapolates"])
    return out


def measure_all(cands: list[Candidate], ctx: Context, min_images: float, what: str) -> list[dict]:
    from tqdm import tqdm

    out = []
    bar = tqdm(cands, desc=what, unit="net", disable=not ctx.args.progress, file=sys.stderr, dynamic_ncols=True)
    for c in bar:
        bar.set_postfix_str(c.key)
        out.append(row(measure_candidate(c, ctx), ctx, min_images))
    bar.close()
    return out


# ------------------------------------------------------------------------------------------------------
# search: rank, grow, report

def ranked(rows: list[dict], speed_weight: float, by: str = "asvit") -> list[dict]:
    """The fitting rows best first, each with its score; the dropped ones after them (score None). by "law":
    the score is the law's predicted top-1 (higher first, ties to fewer parameters, as fastvit.scaling.choose
    orders); "asvit": the rank sum (lower first)."""
    kept = [r for r in rows if r["fits"]]
    if by == "law":
        for r in rows:
            r["score"] = r["predicted_top1"] if r["fits"] else None
        best_first = [kept[i] for i in rank.forecast_order([r["predicted_top1"] for r in kept],
                                                            [r["params"] for r in kept])]
        return best_first + [r for r in rows if not r["fits"]]
    k, ln, im = [r["kappa"] for r in kept], [r["length"] for r in kept], [r["images"] for r in kept]
    scores = rank.rank_sum(k, ln, im, speed_weight)
    for r, s in zip(kept, scores):
        r["score"] = s
    best_first = [kept[i] for i in rank.order(scores, k, ln)]
    for r in rows:
        r.setdefault("score", None)
    return best_first + [r for r in rows if not r["fits"]]


def grow(start: dict, ctx: Context, min_images: float) -> list[dict]:
    """As-ViT's growth from `start`: each step measures the proposals and keeps the best that fits, until
    none fits, the grown net is as big as the budget affords, or --grow-steps steps were taken."""
    path = [start]
    cur = start
    for step in range(ctx.args.grow_steps):
        if rank.growth_done(cur["images"], min_images):
            break
        props = measure_all(grow_proposals(cur["candidate"]), ctx, min_images, f"grow {step + 1}")
        if ctx.args.rank == "law":
            i = rank.forecast_choice([p["predicted_top1"] for p in props], [p["images"] for p in props],
                                     [p["params"] for p in props], min_images=min_images, beat=cur["predicted_top1"])
        else:
            i = rank.grow_choice(props, min_images=min_images, speed_weight=ctx.args.speed_weight)
        if i is None:
            break
        cur = props[i]
        path.append(cur)
    return path


def _fmt(v, spec: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return "inf"
    return format(v, spec)


def table(rows: list[dict], ctx: Context, min_images: float, path: list[dict]) -> str:
    head = ("| # | candidate | score | law top-1 (%) [interval] | κ (NTK cond.) ↓ | L (length) ↑ | params (M) | img/s | "
            "images in budget | epochs | |\n|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---|\n")
    body = ""
    for i, r in enumerate(rows):
        status = "kept" if r["fits"] else "dropped: too slow"
        body += (f"| {i + 1 if r['fits'] else ''} | {r['key']} | {_fmt(r['score'], '.4g')} | {_forecast_cell(r)} | "
                 f"{_fmt(r['kappa'], '.4g')} | "
                 f"{_fmt(r['length'], '.4g')} | {r['params'] / 1e6:.2f} | {r['img_s']:.1f} | {r['images']:,} | "
                 f"{r['epochs']:.2f} | {status} |\n")
    grown = "\n".join(f"{j}. {r['key']} (κ {_fmt(r['kappa'], '.4g')}, L {_fmt(r['length'], '.4g')}, "
                      f"{r['images']:,} images, law {_forecast_cell(r)})" for j, r in enumerate(path))
    if ctx.args.rank == "law":
        how = (f"score = the scaling law's top-1 forecast at (params, images in budget), higher is better "
               f"({ctx.law.describe()}; interval: {INTERVAL_METHOD})")
    else:
        how = f"score = rank(κ) + rank(L) + {ctx.args.speed_weight:g}·rank(images), lower is better"
    far = [r["key"] for r in rows if r.get("extrapolates")]
    if far:
        how += f"; the law extrapolates for {len(far)} of {len(rows)} nets (* in the table)"
    return (f"fastvit-search: {ctx.args.hours:g} h on {ctx.fingerprint['device']}, preset {ctx.preset}, final res "
            f"{ctx.res}; kept: at least {ctx.args.min_epochs:g} epochs ({int(min_images):,} images) in the budget; "
            f"{how}; speeds "
            f"{'compiled' if ctx.args.compile else 'eager (no torch.compile)'}, set-up and evaluation not counted\n\n"
            + (f"{ctx.law_warning}\n\n" if ctx.law_warning else "") + head + body + "\nGrowth (As-ViT's proposals, measured time as the size limit):\n\n" + grown + "\n")


def _forecast_cell(r: dict) -> str:
    if r.get("predicted_top1") is None:
        return "–"
    lo, hi = r["interval"]
    return f"{r['predicted_top1']:.1f} [{lo:.1f}–{hi:.1f}]" + ("*" if r.get("extrapolates") else "")


def best_yaml(r: dict, ctx: Context) -> str:
    import yaml

    from fastvit.train.config import TrainConfig

    c: Candidate = r["candidate"]
    d = TrainConfig.nest({**ctx.common, "model": c.model_name, **c.overrides()})
    for k in ("progress", "compile"):              # probe settings, not the user's
        d.get("run", {}).pop(k, None)
    note = (f"# fastvit-search: {c.key} for {ctx.args.hours:g} h ({ctx.preset} preset): κ {_fmt(r['kappa'], '.4g')}, "
            f"L {_fmt(r['length'], '.4g')}, {r['params'] / 1e6:.2f} M params, ~{r['images']:,} training images\n"
            f"# train it: fastvit-train --config best.yaml --out runs/<name>\n")
    return note + yaml.safe_dump(d, sort_keys=False)


def run_search(args) -> dict:
    ctx = setup(args)
    if args.min_epochs is None:
        args.min_epochs = MIN_EPOCHS[ctx.preset]
    min_images = args.min_epochs * ctx.env.ds.count("train")
    cands = candidates_from_args(args, ctx.preset, ctx.res)
    rows = ranked(measure_all(cands, ctx, min_images, "search"), args.speed_weight, args.rank)
    if not rows[0]["fits"]:
        most = max(rows, key=lambda r: r["images"])
        raise SearchError(f"no candidate sees {args.min_epochs:g} epochs ({int(min_images):,} images) in {args.hours:g} h; "
                          f"the most is {most['images']:,} ({most['key']}): raise --hours or lower --min-epochs", 1)
    path = grow(rows[0], ctx, min_images)
    chosen = path[-1]
    text = table(rows, ctx, min_images, path)
    write_bytes_atomic(ctx.out / "table.md", text.encode())
    write_bytes_atomic(ctx.out / "best.yaml", best_yaml(chosen, ctx).encode())
    result = {"settings": ctx.fingerprint, "hours": args.hours, "min_images": min_images,
              "speed_weight": args.speed_weight, "rank": args.rank,
              "law": None if ctx.law is None else {"params": ctx.law.params, "data": ctx.law.data,
                                                   "provenance": ctx.law.provenance},
              "ranked": [_public(r) for r in rows], "growth": [_public(r) for r in path], "best": _public(chosen)}
    write_json_atomic(ctx.out / "search.json", result)
    print(text)
    print(f"best: {chosen['key']} -> {ctx.out / 'best.yaml'} (fastvit-train --config {ctx.out / 'best.yaml'})")
    print(EVIDENCE[args.rank])
    return result


def _public(r: dict) -> dict:
    out = {k: v for k, v in r.items() if k != "candidate"}
    out["candidate"] = r["candidate"].to_dict()
    if isinstance(out.get("kappa"), float) and not math.isfinite(out["kappa"]):
        out["kappa"] = None
    return out


def main(argv=None) -> int:
    from fastvit.train.config import ConfigError
    from fastvit.train.errors import TrainError, is_oom

    args = build_parser().parse_args(argv)
    try:
        run_search(args)
    except (SearchError, TrainError) as e:               # TrainError: a probe's (out of memory at batch 2)
        print(f"fastvit-search: {e}", file=sys.stderr)
        return e.code
    except ConfigError as e:                             # a --set value fastvit-train refuses for a candidate
        print(f"fastvit-search: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not is_oom(e):
            raise
        print("fastvit-search: out of GPU memory while measuring a candidate (κ keeps 16 per-image gradients "
              "of every weight): narrow the space (--widths, --depths); measured candidates are kept", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastvit-search: interrupted; rerun the same command to continue (measured candidates are kept)",
              file=sys.stderr)
        return 130
    except OSError as e:
        print(f"fastvit-search: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
