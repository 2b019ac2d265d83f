"""Progressive growth in the trainer (--growth none|manual|auto; Li et al., "Automated Progressive
Learning for Efficient Training of Vision Transformers", CVPR 2022).

    manual  the depth grows with the curriculum's resolution stages, linearly from --growth-depth's first
            share of the model's blocks to its last (default 0.5 -> 1, the authors' schedule). At each
            growth (MoGrow) the EMA is grown by in-place duplication (fastvit.models.grow.grow_map) from
            its own weights and the *whole* online model is loaded from it; the optimizer keeps its
            moments, duplicated with their blocks (--growth-opt keep, the default: 0.2-0.4 points better
            on Imagenette) or is a fresh AdamW (fresh, the authors'); the LR schedule continues. The run
            is re-planned from the seconds left (the grown depth's speed is the probe's: every stage
            shape, depth included, was compiled and timed before the first step).
    auto    AutoProg at each curriculum boundary: candidates = the current depth and up to three larger
            ones; the model is grown (MoGrow) to the largest, an elastic supernet whose smaller candidates
            skip the duplicates they do not have (grow.supernet_blocks); its first steps in the new stage
            (the window, --growth-window of the training seconds over all boundaries; real training)
            run the candidates in turn (each once per round, seeded order) and time them. Then each
            candidate is scored on the EMA: mean loss over --growth-score-images fixed training images
            (capped at ~1% of the budget) × (its step time)^w, w = max(-a, 0) from the fit
            loss = c·time^a over the candidates (`choose`); the lowest wins, the model keeps its blocks,
            the rest of the plan takes its depth and is re-planned. Step times: the fastest window step of
            each candidate after its first (not a separate probe: probing three more shapes cost 15% of a
            6-minute CPU budget; the probe is the fallback for a candidate with < 2 window steps).
            Window and scoring are counted in the budget. Every candidate's loss, step time and score go
            to plan.json ("growth") and the log.

The Grower's state (depth, an open window with its timed steps, decisions, measured speeds) is in every
checkpoint, so a resume after a growth, or in a window, carries on where the run was.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from fastvit.models.grow import (grow_map, model_depth, remap_blocks_, remap_optimizer_state_, set_blocks,
                                 supernet_blocks)
from fastvit.stage import Stage

from . import dist
from .errors import TrainError
from .planner import Plan, cut_at, replan
from .run_planner import Proposal


# ------------------------------------------------------------------------------------------------------
# pure pieces

def depth_schedule(n_stages: int, full: int, first: float, last: float) -> list[int]:
    """Depth of each of `n_stages` curriculum stages: linear from first·full to last·full, rounded half
    up, at least 1, never shrinking (6/8/10/12 for 12 blocks, 4 stages, 0.5 -> 1)."""
    if n_stages <= 1:
        return [max(1, int(last * full + 0.5))]
    out = []
    for k in range(n_stages):
        f = first + (last - first) * k / (n_stages - 1)
        out.append(max(1, min(full, int(f * full + 0.5))))
    for k in range(1, n_stages):
        out[k] = max(out[k], out[k - 1])
    return out


def candidate_depths(cur: int, full: int, n: int = 3) -> list[int]:
    """The current depth and up to `n` larger ones, evenly spaced up to the full depth
    (2 of 4: [2, 3, 4]; 6 of 12: [6, 8, 10, 12])."""
    if cur >= full:
        return [full]
    g = max(1, math.ceil((full - cur) / n))
    return sorted({min(full, cur + i * g) for i in range(n + 1)})


def fit_power(times: list[float], losses: list[float]) -> tuple[float, float]:
    """(c, a) of loss = c·time^a by least squares in log-log; a = 0 when the times do not differ."""
    xs = [math.log(t) for t in times]
    ys = [math.log(max(l, 1e-12)) for l in losses]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 1e-12 else 0.0
    return math.exp(my - a * mx), a


def choose(candidates: list[dict]) -> dict:
    """AutoProg's time-aware choice, a pure function: candidates [{"depth", "loss", "step_time"}] ->
    {"choice": index, "scores": [loss·time^w], "w": w, "a": a}, w = max(-a, 0) from fit_power; the
    lowest score wins (ties: the first, i.e. the shallower)."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    _, a = fit_power([c["step_time"] for c in candidates], [c["loss"] for c in candidates])
    w = max(-a, 0.0)
    scores = [c["loss"] * c["step_time"] ** w for c in candidates]
    best = min(range(len(scores)), key=lambda i: (scores[i], i))
    return {"choice": best, "scores": scores, "w": w, "a": a}


def stage_depths(stages: list[Stage], curriculum_res: list[int], depths: list[int]) -> list[Stage]:
    """Each stage at the depth of its curriculum resolution stage (depths[k] for curriculum_res[k])."""
    out = []
    for s in stages:
        k = curriculum_res.index(s.res) if s.res in curriculum_res else len(depths) - 1
        out.append(replace(s, depth=depths[min(k, len(depths) - 1)]))
    return out


def plan_with_depth(plan: Plan, *, step: int, depth_for, speed_of, counted_s: float | None) -> Plan:
    """From `step` on, each stage at depth `depth_for(stage)` (the stage in progress cut at `step`), at
    the speed the probe measured for its new shape (`speed_of(stage)`: images/s, or None to keep its
    speed) times the re-plans' ratio so far; a time plan is then re-planned from the seconds left."""
    done, rest = cut_at(plan, step)
    out = []
    for s in rest:
        new = replace(s, depth=depth_for(s))
        sp = speed_of(new) if new.depth != s.depth else None
        if sp:
            ratio = s.speed / s.probe_speed if s.probe_speed > 0 else 1.0
            new = replace(new, speed=sp * ratio, probe_speed=sp)
        out.append(new)
    new_plan = replace(plan, stages=done + out, replans=list(plan.replans))
    if plan.mode == "time" and counted_s is not None:
        new_plan = replan(new_plan, step=step, counted_s=counted_s, speed_ratio=1.0)
    return new_plan


# ------------------------------------------------------------------------------------------------------
# the trainer's side

class Grower:
    """What the loop calls for growth. `on` False (--growth none): nothing happens anywhere."""

    def __init__(self, cfg, parts, step_fn, env, say, probe=None):
        self.mode = cfg.growth.mode
        self.on = self.mode != "none"
        self.cfg, self.parts, self.step_fn, self.env, self.say = cfg, parts, step_fn, env, say
        self.full = model_depth(parts.model) if hasattr(parts.model, "blocks") else 0
        self.probe = probe                      # auto: stages -> {shape: images/s} (the planner's probe, counted)
        self.depth: int | None = None           # the depth the model runs now
        self.res: int | None = None             # the resolution of the last step (auto: a boundary is a new one)
        self.window: dict | None = None         # auto: an open supernet window
        self.speeds: dict = {}                  # auto: str(shape) -> images/s of the candidates (window/probe)
        self.events: list[dict] = []            # growths and decisions, in order (plan.json, results)
        if self.on and cfg.run.recipe == "baseline":
            raise TrainError("--growth needs --recipe fastvit (the baseline is timm's fixed-depth ViT)", 2)

    # -- stages ---------------------------------------------------------------------------------
    def assign_depths(self, stages: list[Stage], curriculum_res: list[int]) -> list[Stage]:
        if not self.on:
            return stages
        a, b = self.cfg.growth.growth_depth
        depths = depth_schedule(len(curriculum_res), self.full, a, b)
        self.say(f"growth {self.mode}: depth {'/'.join(map(str, depths))} of {self.full} over the resolutions "
                 f"{'/'.join(map(str, curriculum_res))}")
        return stage_depths(stages, curriculum_res, depths)

    def speed_of(self, stage: Stage) -> float | None:
        return self.speeds.get(str(stage.shape))

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"depth": self.depth, "res": self.res, "window": self.window, "speeds": dict(self.speeds),
                "events": list(self.events)}

    def load_state_dict(self, d: dict | None) -> None:
        d = d or {}
        self.depth, self.res, self.window = d.get("depth"), d.get("res"), d.get("window")
        if self.window:                      # the step in flight at the checkpoint: its end was not timed
            self.window["last"] = None
        self.speeds, self.events = dict(d.get("speeds", {})), list(d.get("events", []))

    def record(self) -> dict:
        return {"mode": self.mode, "depth": self.depth, "events": self.events}

    def begin(self, plan: Plan, step: int) -> None:
        """After the plan (new run) or the checkpoint (resume): the model and its EMA at the depth the
        run is at."""
        if not self.on:
            return
        if self.depth is None:
            first = plan.stages[plan.stage_at(step)[0]]
            self.depth, self.res = first.depth or self.full, first.res
        blocks = range(self.window["top"]) if self.window else range(self.depth)
        self._set_all(blocks)

    # -- the loop's hook --------------------------------------------------------------------------
    def before_step(self, plan: Plan, step: int, stage: Stage, clock) -> Proposal | None:
        """Called before every step: a growth when the stage asks for more blocks than the model runs
        (manual: MoGrow; auto: open the window), the window's per-step candidate, its end (score,
        choose, re-plan). Returns the plan it proposes (the rest at the new depth; the loop adopts it,
        and the step trains the adopted plan's stage), or None."""
        if not self.on:
            return None
        got = None
        # the window closes at its end, or earlier when re-plans cut the run short (the last step is the
        # chosen model's)
        if self.window and step >= min(self.window["end"], plan.total_steps - 1):
            got = self._close_window(plan, step, stage, clock)
        elif self.window:
            self._sample(step, clock.counted())
        elif self.mode == "manual" and stage.depth is not None and stage.depth > self.depth:
            new = stage.depth
            self._mogrow(new, step, clock)                      # says what it did
            got = Proposal(plan_with_depth(plan, step=step, depth_for=lambda s: max(s.depth or new, new),
                                           speed_of=self.speed_of, counted_s=clock.counted()), "")
        elif self.mode == "auto" and stage.res != self.res and self.depth < self.full:
            got = self._open_window(plan, step, stage, clock)
            self._sample(step, clock.counted())
        self.res = stage.res
        return got

    # -- manual -------------------------------------------------------------------------------------
    def _mogrow(self, new: int, step: int, clock) -> dict:
        """MoGrow from the current depth to `new`: EMA grown from its own weights, online = grown EMA,
        the optimizer fresh or its moments duplicated. Counted (the loop's clock runs)."""
        t0 = time.perf_counter()
        p, old = self.parts, self.depth
        block_map = grow_map(old, new)
        if p.ema is not None:
            remap_blocks_(p.ema.module, block_map)
            p.model.load_state_dict(p.ema.module.state_dict())
        else:
            remap_blocks_(p.model, block_map)
        if self.cfg.growth.growth_opt == "keep":
            remap_optimizer_state_(p.opt, p.model, block_map)
        else:
            p.opt.state.clear()                              # a fresh AdamW: the LR schedule continues
        self.depth = new
        self._set_all(range(new))
        ev = {"kind": "grow", "step": step, "counted_s": round(clock.counted(), 3), "from": old, "to": new,
              "map": block_map, "opt": self.cfg.growth.growth_opt, "seconds": round(time.perf_counter() - t0, 4)}
        self.events.append(ev)
        self.say(f"growth at step {step}: depth {old} -> {new} (MoGrow from the EMA, blocks {block_map}, "
                 f"optimizer {self.cfg.growth.growth_opt})")
        return ev

    # -- auto ---------------------------------------------------------------------------------------
    def window_steps(self, plan: Plan, n_cands: int, stage: Stage) -> int:
        """The window of one boundary: --growth-window of the training window's seconds (--epochs: of
        its steps) shared by the run's boundaries, in steps of this stage at its planned speed; at least
        two steps of every candidate (their step times are measured there)."""
        n = max(1, len({s.res for s in plan.stages}) - 1)
        share = self.cfg.growth.growth_window / n
        if plan.mode == "time" and stage.speed > 0:
            steps = share * plan.window_s * stage.speed / stage.batch_size
        else:
            steps = share * plan.total_steps
        return max(2 * n_cands, int(round(steps)))

    def _open_window(self, plan: Plan, step: int, stage: Stage, clock) -> Proposal:
        cur = self.depth
        cands = candidate_depths(cur, self.full)
        top = cands[-1]
        self._mogrow(top, step, clock)
        self.depth = cur                                      # the run's depth is chosen at the window's end
        left = plan.total_steps - step
        self.window = {"start": step, "end": step + min(self.window_steps(plan, len(cands), stage), max(1, left - 1)),
                       "cur": cur, "top": top, "cands": cands, "res": stage.res, "keep": stage.keep,
                       "batch": stage.batch_size, "patch_size": stage.patch_size, "speed": stage.speed,
                       "times": {str(c): [] for c in cands}, "last": None}
        self.say(f"growth search at step {step}: supernet of depth {top}, candidates {cands}, window "
                 f"{self.window['end'] - step} steps")
        # the growth's seconds are counted: the rest of the plan shares what is left
        return Proposal(plan_with_depth(plan, step=step, depth_for=lambda s: s.depth, speed_of=self.speed_of,
                                        counted_s=clock.counted()), "")

    def _sample(self, step: int, now: float) -> None:
        """The window's candidate for this step: every candidate once per round of len(cands) steps, in
        an order drawn from the run's seed and the round (a resume draws the same). The counted seconds
        since the previous step's start are that step's time, filed under its candidate."""
        w = self.window
        self._time_last(now)
        i = step - w["start"]
        n = len(w["cands"])
        g = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + w["start"] * 1009 + i // n)
        c = w["cands"][int(torch.randperm(n, generator=g)[i % n])]
        self.step_fn.blocks_override = tuple(supernet_blocks(w["cur"], c, w["top"]))
        w["last"] = [c, now]

    def _time_last(self, now: float) -> None:
        w = self.window
        if w.get("last"):
            c, t0 = w["last"]
            w["times"][str(c)].append(round(now - t0, 6))
            w["last"] = None

    def _step_times(self, w: dict, stage: Stage) -> dict:
        """Each candidate's step time: the fastest of its window steps after its first (which may have
        compiled its graph or waited for the loader: a minimum is what a step costs without the other
        jobs on the machine); the probe's for a candidate with fewer than two window steps."""
        out, todo = {}, []
        for c in w["cands"]:
            ts = w["times"].get(str(c), [])
            if len(ts) >= 2:
                out[c] = min(ts[1:])
            else:
                todo.append(replace(stage, depth=c, steps=0))
        if todo:
            speeds = self.probe(todo)
            for s in todo:
                sp = speeds.get(s.shape) or speeds.get(replace(s, steps=0).shape) or 0.0
                out[s.depth] = w["batch"] / sp if sp > 0 else float("nan")
        return out

    def _close_window(self, plan: Plan, step: int, stage: Stage, clock) -> Proposal:
        w = self.window
        self._time_last(clock.counted())
        self.step_fn.blocks_override = None
        t0 = time.perf_counter()
        times = self._step_times(w, stage)
        losses = self._score_losses(w)
        cands = [{"depth": d, "loss": loss, "step_time": times[d], "window_steps": len(w["times"].get(str(d), []))}
                 for d, loss in zip(w["cands"], losses)]
        if any(not math.isfinite(c["step_time"]) for c in cands):
            raise TrainError("growth search: a candidate has no step time (neither the window nor the probe)", 1)
        cands = dist.broadcast_object(cands, self.env.dist, self.env.device)   # torchrun: rank 0's scores
        got = choose(cands)
        for c in cands:                              # the rest of the plan runs at the measured speed
            shape = Stage(res=w["res"], batch_size=w["batch"], keep=w["keep"], depth=c["depth"],
                          patch_size=w["patch_size"]).shape
            self.speeds[str(shape)] = w["batch"] / c["step_time"]
        best = cands[got["choice"]]["depth"]
        keep = supernet_blocks(w["cur"], best, w["top"])
        self._compact(keep)
        self.depth, self.window = best, None
        for c, s in zip(cands, got["scores"]):
            c["score"] = s
        ev = {"kind": "choose", "step": step, "counted_s": round(clock.counted(), 3), "from": w["cur"],
              "window": [w["start"], step], "candidates": cands, "w": got["w"], "a": got["a"],
              "depth": best, "blocks": keep, "seconds": round(time.perf_counter() - t0, 3)}
        self.events.append(ev)
        self.say("growth search at step {}: ".format(step) + ", ".join(
            f"depth {c['depth']} loss {c['loss']:.4f} time {c['step_time'] * 1e3:.1f} ms score {c['score']:.4f}"
            for c in cands) + f" (w {got['w']:.3f}) -> depth {best}")
        # this resolution runs exactly `best` blocks from here; later ones at least as many
        return Proposal(plan_with_depth(plan, step=step, speed_of=self.speed_of, counted_s=clock.counted(),
                                        depth_for=lambda s: best if s.res == w["res"] else max(s.depth or best, best)),
                        "")

    def _compact(self, blocks: list[int]) -> None:
        """Keep the chosen candidate's blocks (renumbered 0..d-1) in the online model, the EMA (each
        from its own weights) and the optimizer's state."""
        p = self.parts
        remap_optimizer_state_(p.opt, p.model, blocks)
        remap_blocks_(p.model, blocks)
        if p.ema is not None:
            remap_blocks_(p.ema.module, blocks)
        self._set_all(range(len(blocks)))

    @torch.no_grad()
    def _score_losses(self, w: dict) -> list[float]:
        """Mean cross-entropy of each candidate on the same fixed training images (centre crops, one
        fixed order) at the stage's resolution, on the EMA (the online model without one)."""
        from fastvit.data import make_loader

        net = self.parts.ema.module if self.parts.ema is not None else self.parts.model
        n_img = self.cfg.growth.growth_score_images
        if self.cfg.budget_s and w.get("speed"):
            # at most ~1% of the budget for the scoring (a forward is ~1/3 of a training step)
            n_img = max(64, min(n_img, int(0.01 * self.cfg.budget_s * 3 * w["speed"] / len(w["cands"]))))
        bs = max(1, min(w["batch"], n_img))
        loader = make_loader(self.env.source, split="train", res=w["res"], batch_size=bs, train=False, seed=12345,
                             drop_last=False,
                             **self.cfg.data.loader_kwargs())
        batches, seen = [], 0
        try:
            for images, labels in loader:
                batches.append((images.to(self.env.device), labels.to(self.env.device)))
                seen += labels.numel()
                if seen >= n_img:
                    break
        finally:
            close = getattr(loader, "close", None)
            if close:
                close()
        was = net.training
        net.eval()
        out = []
        try:
            for d in w["cands"]:
                set_blocks(net, supernet_blocks(w["cur"], d, w["top"]))
                tot, n = 0.0, 0
                for images, labels in batches:
                    with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.env.amp):
                        logits = net(images)
                    tot += F.cross_entropy(logits.float(), labels, reduction="sum").item()   # SYNC
                    n += labels.numel()
                out.append(tot / max(1, n))
        finally:
            net.train(was)
            set_blocks(net, range(w["top"]))
        return out

    def _set_all(self, blocks) -> None:
        set_blocks(self.parts.model, blocks)
        if self.parts.ema is not None:
            set_blocks(self.parts.ema.module, blocks)


__all__ = ["Grower", "candidate_depths", "choose", "depth_schedule", "fit_power", "plan_with_depth", "stage_depths"]
