"""`--model auto`: the model this budget can train best on this machine, chosen before the run.

    candidates  fastvit.models.shapes.candidate_family(device): widths × depths (heads width/64, MLP 4,
                locality on), each with its parameter count N; and each shape grown (`d4-w128+grow`: --growth manual, its depth
                growing with the curriculum from --growth-depth's first share), forecast at N = its final
                parameters and D = images at full depth + credit × images seen at each shallower depth k
                (1 - c·(1/k - 1/depth), fastvit.scaling.credit). Weighed with --auto-grow (beside the fixed
                ones; off by default: issue 22's growing runs, bench/results/auto) or --growth manual (grown
                ones only); --growth auto weighs fixed ones (AutoProg decides the depth during the run)
    speed       each candidate's training images/s at every stage of the curriculum the config asks
                for: measured by the planner's own probe (RunPlanner.probe: compile + timed synthetic
                steps, counted in the budget), or from the probe cache (keyed by machine + shape: a
                second run on the same machine pays nothing), or -- for the candidates the probe's cap
                (--auto-probe-share, 3% of the budget) leaves unmeasured -- scaled from a measured one
                by FLOPs per image (said in the table), or from --assume-speed FILE (a machine you are
                not on)
    images      plan_budget at those speeds: the images D each candidate sees in this budget (a grown one:
                and how many of them at a shallower depth)
    law         fastvit.scaling: top-1 error = E + A/N^α + B/D^β, from --scaling FILE (fastvit-sweep
                --fit-scaling) or the shipped prior for the device (fastvit/priors)
    choice      the argmax of predicted top-1 (fastvit.scaling.choose, a pure function of law, sizes
                and images); measured first where the cap allows: the candidate ranked first is probed
                until the first is a measured one or the cap is spent

The choice, its forecast with an interval, the runner-up and every candidate's row go to the log,
plan.json and results.json ("model_auto", "predicted_top1"), and into the run's config (the chosen
depth, width, heads and MLP ratio), so --resume keeps the shape.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastvit.models.shapes import GROW, grow_label
from fastvit.stage import Stage

from .errors import TrainError

AUTO = "auto"
SHAPE_KEYS = ("depth", "embed_dim", "num_heads", "mlp_ratio")


# ------------------------------------------------------------------------------------------------------
# the probe cache: machine + shape + stage shape -> images/s

def machine_key(env) -> str:
    """What a measured speed depends on besides the shape: the device, the software, compile and the
    threads. A change of any of them is another machine for the cache."""
    import torch

    from .setup import device_name

    parts = [device_name(env), torch.__version__, f"compile={env.compile}", f"amp={env.amp}",
             f"threads={torch.get_num_threads()}", f"world={env.dist.world}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """FASTVIT_CACHE_DIR, else $XDG_CACHE_HOME/fastvit, else ~/.cache/fastvit."""
    if os.environ.get("FASTVIT_CACHE_DIR"):
        return Path(os.environ["FASTVIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastvit"


class ProbeCache:
    """Measured training images/s per (shape spec, stage shape) for one machine, in one JSON file
    (cache_dir()/probe-<machine key>.json). Reads tolerate a missing or broken file (an empty cache);
    writes are atomic and best effort (a read-only home never stops a run)."""

    def __init__(self, key: str, root: Path | None = None, write: bool = True):
        self.path = (root or cache_dir()) / f"probe-{key}.json"
        self.write = write                  # under torchrun only rank 0 writes (every rank measured the same)
        try:
            self.data = json.loads(self.path.read_text())
            if not isinstance(self.data, dict):
                self.data = {}
        except (OSError, ValueError):
            self.data = {}
        self.hits = self.misses = 0

    @staticmethod
    def _key(spec: str, stage: Stage) -> str:
        res, keep, batch, depth, patch = stage.shape
        return f"{spec}|{res}|{keep:g}|{batch}|{depth}|{patch}"

    def get(self, spec: str, stages: list[Stage]) -> dict | None:
        """{Stage.shape: images/s} when every stage shape of `spec` is cached, else None."""
        got = {}
        for s in stages:
            v = self.data.get(self._key(spec, s))
            if v is None:
                self.misses += 1
                return None
            got[s.shape] = float(v)
        self.hits += 1
        return got

    def put(self, spec: str, stages: list[Stage], speeds: dict) -> None:
        for s in stages:
            if s.shape in speeds:
                self.data[self._key(spec, s)] = round(float(speeds[s.shape]), 4)
        if not self.write:
            return
        try:
            from fastvit.fileio import write_bytes_atomic

            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.path, json.dumps(self.data, indent=1, sort_keys=True).encode())
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------------
# candidates

@dataclass
class Candidate:
    spec: str                                  # "d4-w192" (fastvit.models.shapes)
    overrides: dict                            # depth, embed_dim, num_heads, mlp_ratio
    params: int
    stages: list[Stage] = field(default_factory=list)
    speeds: dict = field(default_factory=dict)  # Stage.shape -> images/s
    speed_from: str = ""                       # "probe", "cache", "flops", "assumed"
    images: int = 0
    grows: bool = False                        # --growth manual: the stages' depths grow to the shape's
    images_shallow: dict = field(default_factory=dict)   # of images: {depth k: seen at k < the shape's} (grows)

    @property
    def name(self) -> str:
        """The candidate's label in every table: the spec, "+grow" when it grows (shapes.grow_label)."""
        return grow_label(self.spec) if self.grows else self.spec

    def row(self) -> dict:
        img_s = {f"{s.res}/{s.keep:g}" + (f"/d{s.depth}" if self.grows and s.depth else ""): round(self.speeds[s.shape], 2)
                 for s in self.stages if s.shape in self.speeds}
        row = {"shape": self.name, "params": self.params, "images": self.images, "speed_from": self.speed_from,
               "img_s": img_s}
        if self.grows:
            row.update(depth=self.overrides["depth"], images_shallow=dict(self.images_shallow),
                       depths=sorted({s.depth for s in self.stages if s.depth}))
        return row


def base_variant(cfg) -> str:
    """The variant a shape overrides: the one named, or for auto shapes.SHAPE_MODEL (locality on)."""
    from fastvit.models.shapes import SHAPE_MODEL

    return SHAPE_MODEL if cfg.model.name == AUTO else cfg.model.name


def shaped(cfg, overrides: dict, grows: bool | None = None):
    """A copy of cfg whose model is its base variant at this shape (name and the four shape settings);
    `grows` True/False sets --growth manual/none (None: the config's)."""
    import copy

    out = copy.deepcopy(cfg)
    out.model.name = base_variant(cfg)
    for k in SHAPE_KEYS:
        setattr(out.model, k, overrides.get(k))
    if grows is not None:
        out.growth.mode = "manual" if grows else "none"
    return out


def grown_stages(cfg, stages: list[Stage], full: int) -> list[Stage] | None:
    """The stages of a shape of depth `full` under --growth manual (growth.depth_schedule over the
    curriculum's resolutions, as the run's Grower assigns them); None when the schedule never trains
    shallower than `full` (nothing grows)."""
    from .growth import depth_schedule, stage_depths

    resolutions = list(dict.fromkeys(s.res for s in stages))
    depths = depth_schedule(len(resolutions), full, *cfg.growth.growth_depth)
    return stage_depths(stages, resolutions, depths) if depths[0] < full else None


def weighs(cfg, law) -> tuple[bool, bool]:
    """(fixed shapes, grown shapes) weighed: --growth none fixed ones, and with --auto-grow the grown ones
    beside them; --growth manual grown ones only; --growth auto fixed ones only (AutoProg decides the depth
    during the run). Grown shapes with a law that has no growth term: one line, exit 2."""
    mode, both = cfg.growth.mode, cfg.budget.auto_grow and cfg.growth.mode == "none"
    if mode == "auto" and cfg.budget.auto_grow:
        raise TrainError("--auto-grow weighs shapes grown by --growth manual; with --growth auto AutoProg chooses "
                         "the depth during the run: give one of them", 2)
    if (mode == "manual" or both) and not law.growth:
        raise TrainError(f"--model auto {'--growth manual' if mode == 'manual' else '--auto-grow'}: the scaling law "
                         "has no growth term, so it cannot forecast a growing run (fit one: fastvit-sweep "
                         "--fit-scaling over --growth manual runs, then --scaling FILE)", 2)
    return mode != "manual", mode == "manual" or both


def candidates(cfg, env, law=None) -> list[Candidate]:
    """Every candidate of the device's family (fastvit.models.shapes.candidate_family) with its parameter
    count and the stages the config asks for at its shape: fixed, and grown where `weighs` says (no law:
    fixed only)."""
    from fastvit.models import shapes

    from .run_planner import config_stages

    candidate_family, param_count, parse_shape = shapes.candidate_family, shapes.param_count, shapes.parse_shape
    fixed, grown = weighs(cfg, law) if law is not None else (True, False)
    out = []
    for spec in candidate_family(env.device.type):
        over = parse_shape(spec)
        stages = config_stages(shaped(cfg, over), env)
        params = param_count(spec, env.ds.num_classes, patch_size=cfg.model.patch_size)
        if fixed:
            out.append(Candidate(spec=spec, overrides=over, params=params, stages=stages))
        growing = grown_stages(cfg, stages, over["depth"]) if grown else None
        if growing:
            out.append(Candidate(spec=spec, overrides=over, params=params, stages=growing, grows=True))
    if not out:                                           # --growth manual, and no shape ever trains shallower
        raise TrainError(f"--model auto --growth manual: no candidate grows (the curriculum has "
                         f"{len({s.res for s in stages})} resolution(s) and --growth-depth is "
                         f"{','.join(f'{v:g}' for v in cfg.growth.growth_depth)}: growth needs two resolutions and "
                         "a first share below 1)", 2)
    return out


def stage_flops(cfg, stage: Stage, gpu: bool, shape: dict | None = None) -> float:
    """Training FLOPs per image of cfg's model (at `shape`'s overrides when given) at one stage: its
    resolution, keep rate, patch size and depth (fastvit.models.vit.train_flops)."""
    from fastvit.models import model_config
    from fastvit.models.vit import train_flops

    vcfg = model_config(base_variant(cfg), **{**cfg.model.overrides(), **(shape or {})})
    vcfg = replace(vcfg, patch_size=stage.patch_size or vcfg.patch_size, depth=stage.depth or vcfg.depth)
    return train_flops(vcfg, stage.res, stage.keep, sparse_locality=gpu and vcfg.sparse_locality)


def images_in(c: Candidate, budget_s: float | None, budget_images: int | None) -> tuple[int, dict]:
    """(images, {depth k: of them seen at k < the shape's}) a candidate sees: plan_budget's at its speeds (an
    image budget: the budget, split by the stages' shares of it)."""
    from .run_planner import images_split

    return images_split(c.stages, c.speeds, budget_s, shallower_than=c.overrides["depth"],
                        budget_images=budget_images if budget_s is None else None)


# ------------------------------------------------------------------------------------------------------
# the choice

@dataclass
class Choice:
    pick: dict                                 # the chosen row (scaling.choose's, with the candidate's)
    rows: list[dict]                           # every candidate, best first
    law: dict                                  # the law's summary (provenance, fitted on)
    warnings: list[str]
    probe_s: float                             # seconds spent probing (counted in the budget)
    cache: dict                                # hits / misses
    growth_off: str = ""                       # why no grown shape was weighed (the printout)

    def to_dict(self) -> dict:
        return {"pick": self.pick, "rows": self.rows, "law": self.law, "warnings": self.warnings,
                "probe_s": round(self.probe_s, 3), "cache": self.cache}

    def lines(self) -> list[str]:
        """The few lines printed at the start of the run."""
        def one(r):
            grown = (f", {sum(r['images_shallow'].values()):,} of them at depth < {r['depth']} (D_eff "
                     f"{r['images_effective']:,})" if r.get("images_effective") is not None else "")
            return (f"{r['shape']} ({r['params'] / 1e6:.2f} M params, {r['images']:,} images{grown}, speed: "
                    f"{r['speed_from']}) predicted top-1 {r['top1']:.1f}% "
                    f"[{r['interval'][0]:.1f}, {r['interval'][1]:.1f}]")
        out = [f"model auto: {one(self.pick)}"]
        if len(self.rows) > 1 and self.rows[1]["top1"] is not None:
            out.append(f"model auto: runner-up {one(self.rows[1])}")
        ext = self.pick.get("extrapolates")
        c = self.law.get("growth_c")
        grown = any(r["shape"].endswith(GROW) for r in self.rows)
        out.append(f"model auto: law {self.law['name']} ({self.law['form']})"
                   + (f"; extrapolating: {ext}" if ext else "")
                   + (f"; grown shapes weighed, growth term c {c:.2f}" if grown else
                      f"; grown shapes not weighed ({self.growth_off})")
                   + f"; {len(self.rows)} candidates, probe "
                   f"{self.probe_s:.1f} s counted, cache {self.cache['hits']} hit(s) / {self.cache['misses']} miss(es)")
        return out + [f"warning: {w}" for w in self.warnings]


def law_for(cfg, env, scaling_file: str | None):
    """The law to choose with: --scaling FILE, else the shipped prior of the device (cpu or gpu), and
    the warning when it was fitted on other data (classes) or another resolution."""
    from fastvit import scaling

    try:
        law = scaling.load_law(scaling_file) if scaling_file else \
            scaling.load_prior("cpu" if env.device.type == "cpu" else "gpu")
    except (OSError, ValueError) as e:
        raise TrainError(f"--scaling {scaling_file or '(prior)'}: {str(e).splitlines()[0]}", 2) from None
    warning = law.mismatch(env.ds.num_classes, env.final_res)
    return law, [warning.removeprefix("warning: ")] if warning else []


def decide(law, cands: list[Candidate]) -> list[dict]:
    """scaling.choose over the candidates (pure), each row with its candidate's speed source."""
    from fastvit import scaling

    rows = scaling.choose(law, [{"shape": c.name, "params": c.params, "images": c.images,
                                 **({"depth": c.overrides["depth"], "images_shallow": c.images_shallow}
                                    if c.grows else {})} for c in cands])
    by = {c.name: c for c in cands}
    return [{**r, **{k: v for k, v in by[r["shape"]].row().items() if k not in r}} for r in rows]


def choose_model(cfg, env, measure, law, *, cache: ProbeCache | None = None, assumed=None, sync=None) -> Choice:
    """The choice for cfg's budget. `measure(cfg_shaped, stages) -> (stages, speeds, seconds)` is the
    planner's probe of one candidate (at most --auto-probe-share of the budget in all); `assumed`
    (speeds.AssumedSpeeds) replaces every measurement (the dry run on a machine you are not on). `sync(obj)`
    (torchrun: rank 0's obj on every rank) makes every rank choose from rank 0's cache and measurements, so
    all probe the same candidates in the same order and take the same pick."""
    sync = sync or (lambda obj: obj)
    from .rules import budget_images

    budget_s, cap_s = cfg.budget_s, probe_cap_s(cfg.budget_s, cfg.budget.auto_probe_share)
    images = budget_images(cfg, env.ds.count("train"))
    cands = candidates(cfg, env, law)
    gpu = env.device.type == "cuda"
    spent = 0.0

    def probe(c: Candidate) -> None:
        nonlocal spent
        # the stages' batches may come back halved (out of memory): the probed stages replace them
        c.stages, speeds, secs = sync(measure(shaped(cfg, c.overrides, c.grows), c.stages))
        spent += secs
        c.speeds, c.speed_from = speeds, "probe"
        if cache is not None:
            cache.put(c.spec, c.stages, speeds)

    if assumed is not None:
        for c in cands:
            c.speeds = {s.shape: assumed.img_s(stage_flops(cfg, s, gpu, c.overrides), s.res, s.keep) for s in c.stages}
            c.speed_from = "assumed"
    else:
        if cache is not None:
            cache.data = sync(cache.data)
        for c in cands:
            hit = cache.get(c.spec, c.stages) if cache is not None else None
            if hit:
                c.speeds, c.speed_from = hit, "cache"
        if not any(c.speed_from for c in cands):          # nothing known: measure the cheapest candidate
            probe(min(cands, key=lambda c: c.params))
        _scale_unmeasured(cfg, cands, gpu)
    while True:
        for c in cands:
            c.images, c.images_shallow = images_in(c, budget_s, images)
        rows = decide(law, cands)
        top = next(c for c in cands if c.name == rows[0]["shape"])
        if top.speed_from != "flops" or spent >= cap_s:
            break
        probe(top)                                        # the best is measured before it is chosen
        _scale_unmeasured(cfg, cands, gpu)
    if rows[0]["top1"] is None:
        raise TrainError("--model auto: the budget leaves no time to train any candidate after set-up "
                         "(raise --minutes/--hours)", 2)
    return Choice(pick=rows[0], rows=rows, law=_law_summary(law), warnings=[], probe_s=spent,
                  cache={"hits": cache.hits if cache else 0, "misses": cache.misses if cache else 0},
                  growth_off=_growth_off(cfg, cands))


def _growth_off(cfg, cands: list[Candidate]) -> str:
    """Why no grown shape is among the candidates ("" when one is), for the printout."""
    if any(c.grows for c in cands):
        return ""
    if cfg.growth.mode == "auto":
        return "--growth auto: AutoProg chooses the depth"
    if not cfg.budget.auto_grow:
        return "--auto-grow off"
    return "no shape grows with this curriculum and --growth-depth"


def _scale_unmeasured(cfg, cands: list[Candidate], gpu: bool) -> None:
    """Candidates without a measured speed: the achieved FLOP rate of the measured ones (per stage
    resolution and keep, averaged; the fixed shapes' where any was measured, a grown one's shallow stages
    being another model than its FLOPs say) over their own FLOPs per image."""
    measured = [c for c in cands if c.speed_from in ("probe", "cache")]
    known = [c for c in measured if not c.grows] or measured
    for c in cands:
        if c.speed_from in ("probe", "cache"):
            continue
        speeds = {}
        for s in c.stages:
            rates = [k.speeds[t.shape] * stage_flops(cfg, t, gpu, k.overrides) for k in known for t in k.stages
                     if (t.res, t.keep) == (s.res, s.keep) and t.shape in k.speeds]
            if rates:
                speeds[s.shape] = (sum(rates) / len(rates)) / stage_flops(cfg, s, gpu, c.overrides)
        c.speeds, c.speed_from = speeds, "flops"


def _law_summary(law) -> dict:
    """What results.json and plan.json keep of the law: its data, form, parameters and held-out error."""
    return {"name": law.data.get("name") or "unnamed", "data": dict(law.data), "form": law.describe(),
            "params": dict(law.params), "provenance": law.provenance,
            "leave_one_budget_out_rmse": law.loo.get("rmse"), "n_range": list(law.n_range),
            "d_range": list(law.d_range), "growth_c": law.growth.get("c") if law.growth else None,
            "growth_loo_rmse": law.growth.get("loo", {}).get("rmse") if law.growth else None}


def apply(cfg, choice: Choice):
    """The run's config at the chosen shape (the name becomes base variant), growing (--growth manual) when
    the pick is a grown one; a fixed pick keeps the config's growth mode (none, or auto's AutoProg)."""
    from fastvit.models.shapes import parse_shape, split_grow

    spec, grows = split_grow(choice.pick["shape"])
    return shaped(cfg, parse_shape(spec), True if grows else None)


def probe_cap_s(budget_s: float | None, share: float) -> float:
    """Seconds the candidates' probes may take: `share` of a time budget (an image budget: 60 s)."""
    return share * budget_s if budget_s else 60.0


def measure_with(env, clock):
    """The planner's probe of one candidate, as choose_model's `measure` (run_planner.probe_config: its
    parts built as the run would, its stages compiled and timed); the seconds are the whole of it, the
    build included, on the run's clock."""
    def measure(cfg_c, stages: list[Stage]) -> tuple[list[Stage], dict, float]:
        from .run_planner import probe_config

        t0 = time.perf_counter()
        fitted, speeds, _ = probe_config(cfg_c, env, stages, clock=clock)
        return fitted, speeds, time.perf_counter() - t0
    return measure


def choose_for_run(cfg, env, clock, say, assumed=None) -> Choice:
    """--model auto for a run (or its dry run): refused for the baseline recipe; the law (--scaling or the
    device's prior), the probe cache of this machine (none for an assumed one), the choice, its lines said.
    Under torchrun every rank probes each candidate together (the probe's steps are DDP steps) and takes
    rank 0's cache and speeds (dist.broadcast_object), so every rank makes rank 0's choice."""
    from . import dist

    if cfg.run.recipe == "baseline":
        raise TrainError("--model auto needs --recipe fastvit (the baseline is timm's ViT at its named size)", 2)
    sync = (lambda obj: dist.broadcast_object(obj, env.dist, env.device)) if env.dist.enabled else None
    law, warnings = law_for(cfg, env, cfg.budget.scaling)
    if assumed is None:
        choice = choose_model(cfg, env, measure_with(env, clock), law, sync=sync,
                              cache=ProbeCache(machine_key(env), write=env.dist.rank == 0))
    else:
        choice = choose_model(cfg, env, None, law, assumed=assumed)
    choice.warnings += warnings
    for line in choice.lines():
        say(line)
    return choice
