"""The training run, top to bottom:

  data + model + optimizer + EMA → probe each shape (counted) → plan → CurriculumLoader →
  for each step: schedules(p) → augment → forward/backward (bf16 on GPU) → clip → AdamW → EMA
               → log / checkpoint / periodic validation (not counted) / re-plan on drift
  → final checkpoint (end of counted time) → full validation, raw and EMA → results.json, curves.png

Sync points with the GPU are marked `# SYNC`. Everything that reads time goes through BudgetClock.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
from collections import deque
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvit.data.dataset import DataError

from . import schedules as S
from .augment import make_mixup, mix_batch, randaugment_groups
from .budget import BudgetClock
from fastvit.fileio import write_bytes_atomic

from .checkpoint import checkpoint_paths, load_latest, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .metrics import MetricsWriter, StepTimer, plot_curves
from fastvit.stage import Stage as Segment

from .planner import BudgetTooSmall, DriftMonitor, Plan, build_stages, plan_budget, probe_speeds, replan

NAN_LIMIT = 10
# what a run writes into its dir besides checkpoints (a re-run without --overwrite must not touch them)
RUN_FILES = ("results.json", "plan.json", "curves.png", "config.json", "metrics.jsonl", "metrics.csv")


class TrainError(Exception):
    """A failure the user can act on; printed as one line. code 2 = usage, 1 = runtime."""

    def __init__(self, msg: str, code: int = 1):
        super().__init__(msg)
        self.code = code


# --------------------------------------------------------------------------------------------------
# small helpers

def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def resolve_device(cfg: TrainConfig) -> torch.device:
    dev = cfg.run.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError("--device cuda was asked for but no CUDA GPU is visible (use --device cpu)", 2)
    return torch.device(dev)


def choose_backend(cfg: TrainConfig, device: torch.device) -> str:
    """Default loader. GPU: DALI (JPEG decode on the GPU's hardware decoder, stage size changes without
    rebuilding the pipeline). CPU: DALI's CPU pipeline too: FFCV spends ~40 s compiling each new
    pipeline with numba on a small CPU (one per curriculum stage plus validation), which a few-minute
    CPU budget cannot afford; DALI builds in about a second. The baseline always reads the source
    JPEGs with torchvision (what users would otherwise run)."""
    if cfg.run.recipe == "baseline":
        return "torchvision"
    if cfg.data.backend:
        return cfg.data.backend
    return "dali"


def open_data(data: str):
    """The prepped dataset (fastvit.data.open_dataset reads and checks the manifest), or one line."""
    from fastvit.data import open_dataset

    if not data:
        raise TrainError("--data is required: a directory written by fastvit-prep", 2)
    if not Path(data).is_dir():
        raise TrainError(f"--data {data} does not exist", 2)
    try:
        return open_dataset(data)
    except DataError as e:
        raise TrainError(f"--data {data}: {e}", 2) from None


def check_data(ds, data: str, backend: str, final_res: int) -> None:
    """Train and val splits readable by `backend` (val at the evaluation resolution), checked before
    any compute so a missing shard is not found after the whole budget was spent."""
    # gpu_resident decodes whichever container the split has; torchvision reads the source tree
    fmt = {"ffcv": "ffcv", "dali": "dali", "gpu_resident": "any"}.get(backend)
    try:
        for split, res in (("train", None), ("val", final_res)):
            ds.require_split(split, res, fmt)
            if backend == "torchvision":
                ds.source_dir(split)
    except DataError as e:
        raise TrainError(f"--data {data}: {e}", 2) from None


def pick_final_res(cfg: TrainConfig, resolutions, patch: int) -> int:
    res = cfg.data.final_res or max(resolutions)
    if res % patch:
        raise TrainError(f"final resolution {res} is not a multiple of the patch size {patch}", 2)
    return res


# --------------------------------------------------------------------------------------------------
# model

class TimmBaseline(nn.Module):
    """timm's plain ViT behind our forward surface: uint8 (or [0,1] float) in, normalization here
    (timm expects normalized float input); keep_rate is ignored (all patches)."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, keep_rate: float | None = None) -> torch.Tensor:
        x = images.float() if images.dtype == torch.uint8 else images.float() * 255.0
        return self.model((x - self.mean) / self.std)


def build_model(cfg: TrainConfig, num_classes: int, base_res: int) -> tuple[nn.Module, nn.Module]:
    """(model to train, module whose parameters the optimizer gets)."""
    overrides = {k: getattr(cfg.model, k) for k in ("depth", "embed_dim", "num_heads") if getattr(cfg.model, k) is not None}
    dpr = max(cfg.schedule.drop_path)
    if cfg.run.recipe == "baseline":
        import timm

        size = cfg.model.name.split("_")[1] if cfg.model.name.startswith("vit_") else "small"
        name = f"vit_{size}_patch16_224"
        m = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=base_res,
                              patch_size=cfg.model.patch_size, drop_path_rate=dpr, **overrides)
        from fastvit.models.configs import IMAGENET_MEAN_255, IMAGENET_STD_255

        return TimmBaseline(m, IMAGENET_MEAN_255, IMAGENET_STD_255), m
    from fastvit.models import create_model

    try:
        m = create_model(cfg.model.name, num_classes=num_classes, patch_size=cfg.model.patch_size,
                         drop_path_rate=dpr, **overrides)
    except ValueError as e:
        raise TrainError(f"--model: {e}", 2) from None
    return m, m


def set_drop_path(model: nn.Module, base: dict, rate: float, max_rate: float) -> None:
    """Scale every DropPath's probability to `rate` (the per-block ramp of the stochastic depth rule is
    kept). Changes only at segment boundaries: a compiled graph guards on it."""
    if max_rate <= 0:
        return
    for name, mod in model.named_modules():
        if name in base:
            mod.drop_prob = base[name] * rate / max_rate


def drop_path_modules(model: nn.Module) -> dict:
    from timm.layers import DropPath

    return {n: m.drop_prob for n, m in model.named_modules() if isinstance(m, DropPath)}


# --------------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(model: nn.Module | dict, batches, *, device, amp: bool, max_images: int | None = None) -> dict:
    """top-1 / top-5 (%) with all patches. `model` may be {name: model}: every model then sees the
    very same batches in one pass (raw and EMA weights compared on identical images), and the result
    is {name: {top1, top5, images}}. Stops after the batch that reaches `max_images`."""
    models = model if isinstance(model, dict) else {"_": model}
    was = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    n = 0
    hits = {k: [0, 0] for k in models}                                                    # top-1, top-5
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        for k, m in models.items():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = m(images)
            kk = min(5, logits.shape[1])
            top = logits.float().topk(kk, dim=1).indices                                # (B,k)
            hit = top.eq(labels.view(-1, 1))
            hits[k][0] += hit[:, 0].sum().item()                                         # SYNC
            hits[k][1] += hit.any(dim=1).sum().item()
        n += labels.numel()
        if max_images and n >= max_images:
            break
    for k, m in models.items():
        m.train(was[k])
    if n == 0:
        raise TrainError("the validation loader gave no images", 1)
    out = {k: {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "images": n} for k, (c1, c5) in hits.items()}
    return out if isinstance(model, dict) else out["_"]


# --------------------------------------------------------------------------------------------------
# the run

class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, log=None,
                 clock_fn=None, ignored_flags=()):
        self.cfg = cfg
        self.ignored_flags = list(ignored_flags)   # given with --resume; the saved config wins
        self.resume = resume
        self.overwrite = overwrite
        self._log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self._clock_fn = clock_fn
        self._prior: list[Path] = []   # a previous run's files, replaced under --overwrite
        self._val = None          # the val loader, kept between evaluations (see validate)

    def log(self, msg: str) -> None:
        self._log(f"[fastvit-train] {msg}")

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        cfg = self.cfg
        self.run_dir = Path(cfg.run.out)
        ck = None
        if self.resume:
            got = load_latest(self.run_dir, self.log)
            if got is None:
                raise TrainError(f"nothing to resume in {self.run_dir}: no readable checkpoint", 2)
            ck, path = got
            saved = TrainConfig.from_dict(ck["config"])
            saved.run.progress = cfg.run.progress
            cfg = self.cfg = saved
            self.log(f"resuming from {path.name}: step {ck['step']}, {ck['counted_s']:.1f} counted s")
            if self.ignored_flags:
                self.log(f"warning: ignored with --resume (the run's saved config wins): {', '.join(self.ignored_flags)}")
        else:
            # a previous run's files (checkpoints, results, metrics): never replaced without --overwrite
            prior = checkpoint_paths(self.run_dir) + [self.run_dir / n for n in RUN_FILES
                                                      if (self.run_dir / n).is_file()]
            if prior and not self.overwrite:
                if (self.run_dir / "results.json").is_file():
                    raise TrainError(f"{self.run_dir} holds a finished run (results.json): pass --overwrite to "
                                     "replace it, or choose another --out", 2)
                raise TrainError(f"{self.run_dir} holds an unfinished run: pass --resume to continue it, "
                                 "--overwrite to start over, or choose another --out", 2)
            self._prior = prior      # removed once the data and settings are checked (below)
            if not cfg.has_budget:
                raise TrainError("give a budget: --hours H, --minutes M or --epochs N", 2)
        kw = {"clock": self._clock_fn} if self._clock_fn else {}
        self.clock = BudgetClock(cfg.budget_s, counted_s=ck["counted_s"] if ck else 0.0, **kw)
        self.ckpt = ck

        self.ds = open_data(cfg.data.root)
        self.device = resolve_device(cfg)
        self.cuda = self.device.type == "cuda"
        self.amp = cfg.run.amp if cfg.run.amp is not None else self.cuda
        self.do_compile = cfg.run.compile if cfg.run.compile is not None else self.cuda
        self.backend = choose_backend(cfg, self.device)
        self.num_classes = self.ds.num_classes
        self.final_res = pick_final_res(cfg, self.ds.resolutions, cfg.model.patch_size)
        if cfg.run.recipe == "baseline" and (cfg.data.baseline_res or self.final_res) != self.final_res:
            self.final_res = cfg.data.baseline_res
        check_data(self.ds, cfg.data.root, self.backend, self.final_res)
        self.train_count = self.ds.count("train")
        if self._prior:
            self.log(f"starting over in {self.run_dir} (--overwrite: the previous run's files are replaced)")
            for p in self._prior:
                p.unlink(missing_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            torch.manual_seed(cfg.run.seed)
            import numpy as np
            import random

            np.random.seed(cfg.run.seed)
            random.seed(cfg.run.seed)
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.model, opt_module = build_model(cfg, self.num_classes, self.final_res)
        self.model.to(self.device).train()
        self.dp_base = drop_path_modules(self.model)
        self.dp_max = max(cfg.schedule.drop_path)
        # drop-path rate per shape, from the config's own segments (not the re-planned ones, whose
        # cut ranges would move it): a compiled graph guards on the rate, so one rate per shape
        self.dp_of = {}
        for sg in self.segments():
            self.dp_of.setdefault(sg.shape, S.aug_at(0.5 * (sg.f0 + sg.f1), drop_path=cfg.schedule.drop_path).drop_path)
        from timm.optim import create_optimizer_v2

        # weight decay on weights only: timm's factory skips 1-D params (biases, norms) and the
        # model's no_weight_decay() names (pos_embed, cls_token)
        self.opt = create_optimizer_v2(opt_module, opt=cfg.schedule.opt, lr=cfg.schedule.lr, weight_decay=cfg.schedule.weight_decay)
        self.ema = None
        if cfg.schedule.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=0.999, use_warmup=True)
        self.mixup = make_mixup(mixup=cfg.schedule.mixup, cutmix=cfg.schedule.cutmix, label_smoothing=cfg.schedule.label_smoothing,
                                num_classes=self.num_classes)
        self.step_model = self.model
        if self.do_compile and cfg.run.recipe == "baseline":
            # timm's model, not ours: plain torch.compile, static shapes (one resolution)
            self.step_model = torch.compile(self.model, dynamic=False)
        self.compile_s = 0.0
        self.nan_run = 0
        self.nan_total = 0
        self.step = 0
        self.evals_done = 0
        self.history_val: list[dict] = []
        self.val_s_total = 0.0

        if ck:
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["opt"])
            if self.ema is not None and ck.get("ema") is not None:
                self.ema.module.load_state_dict(ck["ema"])
            self.plan = Plan.from_dict(ck["plan"])
            self.step = ck["step"]
            self.evals_done = ck.get("evals_done", 0)
            self.nan_total = ck.get("nan_total", 0)
            self.val_s_total = ck.get("val_s", 0.0)
            set_rng_state(ck["rng"])
            self.ckpt = None   # free the memory
            k0, _ = self.plan.stage_at(min(self.step, self.plan.total_steps - 1))
            self.compile_shapes(self.plan.stages[k0:])
        else:
            self.plan = self.make_plan()
            write_bytes_atomic(self.run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2).encode())
        self.save_plan()
        if self.ema is not None:
            self.ema.decay = self.ema_decay()
        self.metrics = MetricsWriter(self.run_dir, resume_step=self.step if self.resume else None)

    def ema_decay(self) -> float:
        """Half-life = ema_halflife × planned steps: the EMA averages the same share of any budget."""
        hl = max(1.0, self.cfg.schedule.ema_halflife * self.plan.total_steps)
        return 0.5 ** (1.0 / hl)

    def segments(self) -> list[Segment]:
        cfg = self.cfg
        if cfg.run.recipe == "baseline":
            return [Segment(res=self.final_res, keep=1.0, batch_size=cfg.schedule.batch_size, lr_scale=1.0, f0=0.0, f1=1.0)]
        try:
            cur = S.parse_curriculum(cfg.data.curriculum) if cfg.data.curriculum else \
                S.default_curriculum(self.final_res, cfg.model.patch_size, cfg.data.curriculum_stages)
        except ValueError as e:
            raise TrainError(f"--curriculum {cfg.data.curriculum!r}: {e}", 2) from None
        bad = [r for r, _ in cur if r % cfg.model.patch_size]
        if bad:
            raise TrainError(f"curriculum resolutions {bad} are not multiples of the patch size {cfg.model.patch_size}", 2)
        return build_stages(curriculum=cur, keep_kind=cfg.schedule.keep_schedule, keep_min=cfg.schedule.keep_min,
                              keep_full_from=cfg.schedule.keep_full_from, keep_cycles=cfg.schedule.keep_cycles,
                              keep_step=cfg.schedule.keep_step, splits_per_stage=cfg.schedule.keep_splits,
                              base_batch=cfg.schedule.batch_size, ref_res=self.final_res,
                              const_tokens=cfg.schedule.const_tokens, max_batch=cfg.schedule.max_batch,
                              lr_rule=cfg.schedule.lr_scaling, patch=cfg.model.patch_size)

    # ------------------------------------------------------------------ planning
    def make_plan(self) -> Plan:
        cfg = self.cfg
        segs = self.segments()
        if cfg.budget_s is None:                      # --epochs: an image budget; no probe needed
            self.compile_shapes(segs)
            return plan_budget(segs, budget_images=int(round(cfg.budget.epochs * self.train_count)))
        # probe: compile + time every shape on synthetic data; weights and optimizer restored after
        snap_model = copy.deepcopy(self.model.state_dict())
        snap_opt = copy.deepcopy(self.opt.state_dict())
        rng = rng_state()

        def run_step(shape):
            res, keep, batch = shape[:3]
            x = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, device=self.device)
            y = torch.randint(0, self.num_classes, (batch,), device=self.device)
            self.train_step(x, y, keep=keep, lr=0.0, mix_prob=max(cfg.schedule.mix_prob),
                            randaug=max(cfg.schedule.randaug), probe=True)
            if self.cuda:
                torch.cuda.synchronize()                                                 # SYNC

        def on_oom(shape, new_batch):
            self.log(f"out of GPU memory at res {shape[0]}, keep {shape[1]}, batch {shape[2]}: "
                     f"halving to batch {new_batch} (LR scaled by {cfg.schedule.lr_scaling} rule)")
            if self.cuda:
                torch.cuda.empty_cache()

        shapes = [s.shape for s in segs]
        self.compile_shapes(segs)

        def run_shape(shape):   # with the drop-path rate its graph was compiled with
            set_drop_path(self.model, self.dp_base, self.dp_of.get(shape, 0.0), self.dp_max)
            run_step(shape)

        self.log(f"probing {len(set(shapes))} shape(s) (compile={'on' if self.do_compile else 'off'})")
        if self.do_compile:      # compiled above; one warm-up step (optimizer state, caches), then timed
            speeds, fixes = probe_speeds(shapes, run_shape, self.clock.now, warmup=1, iters=cfg.budget.probe_iters,
                                         is_oom=_is_oom, on_oom=on_oom)
        else:                    # eager: one warm-up step (lazy init); a small batch gives images/s as well
            small = {s: (s[0], s[1], min(s[2], 32), *s[3:]) for s in shapes}
            sp, _ = probe_speeds(list(small.values()), run_step, self.clock.now, warmup=1,
                                 iters=cfg.budget.probe_iters, is_oom=_is_oom, on_oom=on_oom)
            speeds = {s: sp[small[s]] for s in shapes}
            fixes = {s: s for s in shapes}
        segs = [replace(s, batch_size=fixes[s.shape][2],
                        lr_scale=S.lr_scale_for_batch(fixes[s.shape][2], cfg.schedule.batch_size, cfg.schedule.lr_scaling))
                if fixes[s.shape] != s.shape else s for s in segs]
        self.model.load_state_dict(snap_model)
        self.opt.load_state_dict(snap_opt)
        set_rng_state(rng)
        del snap_model, snap_opt
        # the first loader stage is built after planning; its start-up is measured on the first
        # step and handled by the drift check
        setup = self.clock.counted()
        reserve = min(120.0, max(0.5, 0.005 * cfg.budget_s))   # the final checkpoint
        try:
            plan = plan_budget(segs, speeds=speeds, budget_s=cfg.budget_s, setup_s=setup, reserve_s=reserve)
        except BudgetTooSmall as e:
            raise TrainError(str(e), 2) from None
        return plan

    def _drop_path(self, seg: Segment) -> float:
        return self.dp_of.get(seg.shape, S.aug_at(0.5 * (seg.f0 + seg.f1), drop_path=self.cfg.schedule.drop_path).drop_path)

    def compile_shapes(self, segs) -> None:
        """Compile every (res, keep, batch) of `segs` ahead of time through fastvit.models.compile_model
        (fullgraph, static shapes: one graph per shape; dynamo's default would go dynamic after the
        second resolution and stop compiling after 8 graphs), counted in the budget. Each segment's
        drop-path rate is a constant of its graph, so segments are warmed with their own rate."""
        if not self.do_compile or self.cfg.run.recipe != "fastvit" or not segs:
            return
        from fastvit.models import compile_model
        from fastvit.models.compile import raise_recompile_limit

        cfg = self.cfg
        t0 = self.clock.counted()
        amp = torch.bfloat16 if self.amp else None
        by_dp: dict = {}
        for sg in segs:
            shape = (sg.res, float(sg.keep), sg.batch_size)
            if shape not in by_dp.setdefault(self._drop_path(sg), []):
                by_dp[self._drop_path(sg)].append(shape)
        n = sum(len(v) for v in by_dp.values())
        first = True
        for dp, shapes in by_dp.items():
            set_drop_path(self.model, self.dp_base, dp, self.dp_max)
            if first:   # one compiled module for the run (dynamo's cache is per module and backend)
                raise_recompile_limit(2 * n)  # several drop-path rates per shape, eval
                self.step_model = compile_model(self.model, shapes, amp_dtype=amp, device=self.device)
                first = False
            else:       # the same module warmed at another drop-path rate
                for res, keep, b in shapes:
                    x = torch.randint(0, 256, (b, 3, res, res), dtype=torch.uint8, device=self.device)
                    with torch.autocast(self.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                        out = self.step_model(x, keep_rate=keep) if keep < 1.0 else self.step_model(x)
                    out.float().sum().backward()
                self.opt.zero_grad(set_to_none=True)
        self.compile_s += self.clock.counted() - t0
        self.log(f"compiled {n} shape(s) ahead of time in {self.clock.counted() - t0:.1f} s (counted)")

    def save_plan(self) -> None:
        write_bytes_atomic(self.run_dir / "plan.json", self.plan.dumps().encode())

    # ------------------------------------------------------------------ loader
    def _loader_stages(self):
        from fastvit.data import Stage

        out = []
        for s in self.plan.stages:
            if out and out[-1].loader_key == s.loader_key:
                out[-1] = Stage(s.res, s.batch_size, out[-1].steps + s.steps)
            elif s.steps:
                out.append(Stage(s.res, s.batch_size, s.steps))
        return out

    def open_loader(self):
        from fastvit.data import CurriculumLoader, Stage

        stages = self._loader_stages()
        kw = dict(backend=self.backend, device=str(self.device), seed=self.cfg.run.seed)
        if self.cfg.data.workers:
            kw["workers"] = self.cfg.data.workers
        try:
            return CurriculumLoader(self.ds, stages, start_step=self.step, **kw)
        except DataError as e:   # missing shard/source tree: one line
            raise TrainError(f"loader ({self.backend}): {e}", 2) from None

    def open_val(self, res: int):
        from fastvit.data import make_val_loader

        kw = dict(res=res, batch_size=max(16, min(256, self.cfg.schedule.batch_size)), backend=self.backend,
                  device=str(self.device))
        if self.cfg.data.workers:
            kw["workers"] = self.cfg.data.workers
        try:
            return make_val_loader(self.ds, **kw)
        except DataError as e:   # val shard missing at this res, flat val/ for torchvision, ...: one line
            raise TrainError(f"val loader ({self.backend}, {res} px): {e}", 2) from None

    # ------------------------------------------------------------------ one step
    def train_step(self, images, labels, *, keep: float, lr: float, mix_prob: float, randaug: float,
                   probe: bool = False) -> float | None:
        """images (B,3,r,r) uint8 on device, labels (B,). Returns the loss, or None when skipped (NaN)."""
        cfg = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = lr
        if randaug > 0:
            images = randaugment_groups(images, randaug, cfg.schedule.randaug_ops)
        images, targets = mix_batch(self.mixup, images, labels, mix_prob)                # (B,3,r,r), (B,C)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            # the call form compile_model warmed up: no keep argument for all patches
            logits = self.step_model(images, keep_rate=keep) if keep < 1.0 else self.step_model(images)  # (B,C)
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.schedule.clip_grad if cfg.schedule.clip_grad > 0 else 1e12)
        loss_v = loss.item()                                                             # SYNC
        if not (math.isfinite(loss_v) and torch.isfinite(gnorm).item()):
            self.opt.zero_grad(set_to_none=True)
            if not probe:
                self.nan_run += 1
                self.nan_total += 1
            return None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if not probe:
            self.nan_run = 0
            if self.ema is not None:
                self.ema.update(self.model, step=self.step)
        return loss_v

    # ------------------------------------------------------------------ checkpoint
    def save(self) -> Path:
        st = {
            "config": self.cfg.to_dict(), "model": self.model.state_dict(), "opt": self.opt.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "plan": self.plan.to_dict(), "step": self.step, "counted_s": self.clock.counted(),
            "rng": rng_state(), "loader_position": {"global_step": self.step, "seed": self.cfg.run.seed},
            "evals_done": self.evals_done, "nan_total": self.nan_total, "val_s": self.val_s_total,
        }
        return save_checkpoint(self.run_dir, self.step, st)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        self.setup()
        cfg = self.cfg
        plan = self.plan
        self.log(f"device {self.device} ({self.device_name()}), backend {self.backend}, "
                 f"recipe {cfg.run.recipe}, model {cfg.model.name}, final res {self.final_res}")
        self.log("plan: " + ", ".join(f"res {s.res} keep {s.keep:g} batch {s.batch_size} × {s.steps}"
                                      for s in plan.stages) + f" = {plan.total_steps} steps")
        from tqdm import tqdm

        bar = tqdm(total=plan.total_steps, initial=self.step, disable=not cfg.run.progress, unit="step",
                   dynamic_ncols=True, file=sys.stderr)
        loader = self.open_loader() if self.step < plan.total_steps else None
        it = iter(loader) if loader is not None else None
        self._val = None
        last_ckpt_t = self.clock.counted()
        window: deque = deque(maxlen=max(20, 2 * cfg.run.log_every))   # (counted_s, images) per step
        cur_seg = -1
        seg_first_step = self.step
        loss_ema = None
        waits: deque = deque(maxlen=100)
        iv = {"t": self.clock.counted(), "wait": 0.0, "images": 0}   # since the last log record
        drift = DriftMonitor(cfg.budget_s or 1.0, tol=cfg.budget.replan_tol)
        timer = StepTimer(self.cuda, self.clock.now)     # per-step compute time (GPU-busy share)
        try:
            while self.step < self.plan.total_steps:
                plan = self.plan
                k, j = plan.stage_at(self.step)
                seg = plan.stages[k]
                if k != cur_seg:
                    cur_seg, seg_first_step = k, self.step
                    window.clear()
                    set_drop_path(self.model, self.dp_base, self._drop_path(seg), self.dp_max)
                f = plan.progress_at(self.step)                   # training-window progress
                lr = S.lr_at(f, base_lr=cfg.schedule.lr, warmup=cfg.schedule.warmup, decay=cfg.schedule.lr_decay) * seg.lr_scale
                aug = S.aug_at(f, mix_prob=cfg.schedule.mix_prob, randaug=cfg.schedule.randaug, drop_path=cfg.schedule.drop_path)
                t_wait = self.clock.now()
                try:
                    images, labels, _stage = next(it)
                except StopIteration:
                    raise TrainError(f"the loader stopped at step {self.step} of {plan.total_steps}", 1) from None
                except DataError as e:
                    # stages are built in the background: a missing backend, a count mismatch or an
                    # ImageFolder error surfaces here, at the first batch of the stage
                    raise TrainError(f"train loader ({self.backend}): {e}", 2) from None
                wait = self.clock.now() - t_wait
                waits.append(wait)
                iv["wait"] += wait
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                if images.shape[-1] != seg.res or images.shape[0] != seg.batch_size:
                    raise TrainError(f"loader gave {tuple(images.shape)} at step {self.step}, plan wants "
                                     f"res {seg.res} batch {seg.batch_size}", 1)
                timer.start()
                try:
                    loss = self.train_step(images, labels, keep=seg.keep, lr=lr, mix_prob=aug.mix_prob,
                                           randaug=aug.randaug_mag)
                except Exception as e:  # noqa: BLE001
                    timer.cancel()
                    if not _is_oom(e):
                        raise
                    loader, it = self.handle_oom(loader, seg)
                    continue
                timer.stop()                                      # the EMA update is inside the span
                if loss is None and self.nan_run >= NAN_LIMIT:
                    path = self.save()
                    raise TrainError(f"loss was NaN/inf for {NAN_LIMIT} steps in a row (step {self.step}); "
                                     f"stopped, last good weights kept in {path}", 1)
                self.step += 1
                now = self.clock.counted()
                window.append((now, seg.batch_size))
                iv["images"] += seg.batch_size
                if seg.speed > 0:
                    drift.step_done(now, seg.batch_size / seg.speed)
                if loss is not None:
                    loss_ema = loss if loss_ema is None else 0.9 * loss_ema + 0.1 * loss
                bar.update(1)
                if self.step % cfg.run.log_every == 0 or self.step == self.plan.total_steps:
                    ips = self._speed(window)
                    rec = {"kind": "train", "step": self.step, "counted_s": round(now, 3),
                           "p": round(self.clock.progress(), 5) if cfg.budget_s else
                           round(self.plan.progress_at(self.step), 5),
                           "segment": k, "res": seg.res, "keep": seg.keep, "batch": seg.batch_size, "lr": lr,
                           "loss": loss, "images_per_s": ips, "data_wait": sum(waits) / max(1, len(waits)),
                           "mix_prob": aug.mix_prob, "drop_path": aug.drop_path, "nan_skipped": self.nan_total,
                           "interval_s": round(now - iv["t"], 6), "interval_wait_s": round(iv["wait"], 6),
                           "interval_images": iv["images"], "interval_compute_s": round(timer.take(), 6)}
                    self.metrics.log(rec)
                    iv = {"t": now, "wait": 0.0, "images": 0}
                    left = (cfg.budget_s - now) if cfg.budget_s else None
                    bar.set_postfix_str(
                        f"seg {k + 1}/{len(self.plan.stages)} res {seg.res} keep {seg.keep:g} "
                        f"{ips or 0:.0f} img/s loss {loss_ema if loss_ema is not None else float('nan'):.3f} "
                        + (f"budget {now:.0f}/{cfg.budget_s:.0f}s left {left:.0f}s" if left is not None
                           else f"images {self.plan.images_until(self.step)}/{self.plan.budget_images}"))
                # re-plan (time budgets): the smoothed real speed is >10% off the plan, or the run
                # would miss the budget's end by more than ~1% (DriftMonitor: fresh span after each
                # re-plan, a minimum interval between them, so a noisy machine does not thrash)
                ratio = drift.check(now, self.plan, self.step) if self.plan.mode == "time" else None
                if ratio is not None:
                    old = self.plan.total_steps
                    self.plan = replan(self.plan, step=self.step, counted_s=now, speed_ratio=ratio)
                    self.save_plan()
                    self.log(f"re-plan at step {self.step} ({now:.0f} s): running at {ratio:.2f}× the "
                             f"planned speed; {old} → {self.plan.total_steps} steps")
                    drift.restart(now)
                    bar.total = self.plan.total_steps
                    bar.refresh()
                    loader, it = self._replan_loader(loader, it)
                    cur_seg = -1
                    window.clear()
                # checkpoint (counted)
                if (now - last_ckpt_t >= cfg.run.ckpt_minutes * 60 or
                        (cfg.run.ckpt_every_steps and self.step % cfg.run.ckpt_every_steps == 0)) \
                        and self.step < self.plan.total_steps:
                    self.save()
                    last_ckpt_t = self.clock.counted()
                # periodic validation (not counted)
                if cfg.run.evals and self.evals_done < cfg.run.evals and self.step < self.plan.total_steps and \
                        self.plan.progress_at(self.step) >= (self.evals_done + 1) / (cfg.run.evals + 1):
                    with self.clock.excluded() as ex:
                        r = self.validate(cfg.run.eval_images)
                    self.val_s_total += ex["seconds"]
                    self.evals_done += 1
                    self.metrics.log({"kind": "val", "step": self.step, "counted_s": round(self.clock.counted(), 3),
                                      **r, "val_s": round(ex["seconds"], 3)})
                    self.log(f"val @ step {self.step}: top-1 {r['top1']:.2f}% (EMA {r.get('ema_top1', float('nan')):.2f}%)")
        except BaseException:
            self.close_val()
            raise
        finally:
            bar.close()
            if loader is not None and hasattr(loader, "close"):
                loader.close()
        # final checkpoint: the end of the counted time
        self.save()
        counted = self.clock.counted()
        with self.clock.excluded() as ex:
            try:
                final = self.validate(None)          # the full val split, from its first image
            finally:
                self.close_val()
        self.val_s_total += ex["seconds"]
        self.metrics.log({"kind": "val", "step": self.step, "counted_s": round(counted, 3), **final,
                          "val_s": round(ex["seconds"], 3)})
        results = self.results(counted, final)
        write_bytes_atomic(self.run_dir / "results.json", json.dumps(results, indent=2).encode())
        try:
            plot_curves(self.metrics.rows, self.run_dir / "curves.png",
                        title=f"{cfg.run.recipe} {cfg.model.name}: top-1 {final['top1']:.1f}%")
        finally:
            self.metrics.close()
        return results

    def _speed(self, window) -> float | None:
        if len(window) < 2:
            return None
        dt = window[-1][0] - window[0][0]
        imgs = sum(b for _, b in list(window)[1:])
        return imgs / dt if dt > 0 else None

    def _replan_loader(self, loader, it):
        """Hand the new plan to the running CurriculumLoader: same res and batch continue, a changed
        later stage is built in the background at its turn (no stall, no rebuild of the current one)."""
        if loader is None:
            return loader, it
        try:
            loader.replan(self._loader_stages())
        except DataError as e:   # a plan whose served history changed
            self.log(f"re-plan: the loader could not take the new plan in place ({e}); reopening it")
            return self._reopen(loader)
        return loader, it

    def _reopen(self, loader):
        if loader is not None and hasattr(loader, "close"):
            loader.close()
        loader = self.open_loader()
        return loader, iter(loader)

    def handle_oom(self, loader, seg: Segment):
        """Out of GPU memory in the loop: halve the batch of this and later segments at this res,
        scale the LR, log it, re-open the loader at the same step."""
        new_b = seg.batch_size // 2
        if new_b < 2:
            raise TrainError(f"out of GPU memory even at batch {seg.batch_size} (res {seg.res}); "
                             "use a smaller --model", 1)
        self.opt.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.empty_cache()
        cfg = self.cfg
        new_scale = S.lr_scale_for_batch(new_b, cfg.schedule.batch_size, cfg.schedule.lr_scaling)   # as the planner's segments
        self.log(f"out of GPU memory at res {seg.res}, batch {seg.batch_size}: continuing with batch {new_b}, "
                 f"LR scale {seg.lr_scale:g} -> {new_scale:g} ({cfg.schedule.lr_scaling} rule, reference batch {cfg.schedule.batch_size})")
        if self.plan.mode == "time":
            self.plan = replan(self.plan, step=self.step, counted_s=self.clock.counted(), speed_ratio=1.0,
                               new_batch={seg.res: new_b}, base_batch=cfg.schedule.batch_size, lr_rule=cfg.schedule.lr_scaling)
        else:
            segs = []
            k, j = self.plan.stage_at(self.step)
            for i, s in enumerate(self.plan.stages):
                if i >= k and s.res == seg.res and s.batch_size > new_b:
                    todo = s.steps - (j if i == k else 0)
                    extra = todo * s.batch_size // new_b - todo
                    s = replace(s, batch_size=new_b, lr_scale=new_scale, steps=s.steps + extra)
                segs.append(s)
            self.plan = replace(self.plan, stages=segs)
        self.save_plan()
        return self._reopen(loader)

    def validate(self, max_images) -> dict:
        """Raw and EMA weights in one pass over the same batches, from the first image of the val split
        (a capped evaluation stops mid-epoch; the next one does not continue there). The val loader is
        kept between evaluations while it stands at an epoch start, else reopened."""
        v = self._val
        if v is not None and (getattr(v, "closed", False) or v.next_index % len(v) != 0):
            v.close()
            v = self._val = None
        if v is None:
            v = self._val = self.open_val(self.final_res)
        models = {"raw": self.model}
        if self.ema is not None:
            models["ema"] = self.ema.module
        try:
            r = evaluate(models, v, device=self.device, amp=self.amp, max_images=max_images)
        except DataError as e:   # a backend that opens its stream at the first batch
            self.close_val()
            raise TrainError(f"val loader ({self.backend}, {self.final_res} px): {e}", 2) from None
        out = {"top1": r["raw"]["top1"], "top5": r["raw"]["top5"], "val_images": r["raw"]["images"]}
        if "ema" in r:
            out.update(ema_top1=r["ema"]["top1"], ema_top5=r["ema"]["top5"])
        return out

    def close_val(self) -> None:
        if self._val is not None:
            self._val.close()
            self._val = None

    def device_name(self) -> str:
        if self.cuda:
            return torch.cuda.get_device_name(self.device)
        from fastvit.sysinfo import cpu_model

        cpu = cpu_model()
        return f"cpu: {cpu} ({os.cpu_count()} cores)"

    def results(self, counted: float, final: dict) -> dict:
        cfg, plan = self.cfg, self.plan
        stages = [{"res": s.res, "keep": s.keep, "batch_size": s.batch_size, "steps": s.steps,
                   "lr_scale": round(s.lr_scale, 4), "planned_images_per_s": round(s.speed, 2)}
                  for s in plan.stages]
        return {
            "top1": final["top1"], "top5": final["top5"],
            "ema_top1": final.get("ema_top1"), "ema_top5": final.get("ema_top5"),
            "eval_res": self.final_res, "val_images": final["val_images"],
            "budget_s": cfg.budget_s, "budget_images": plan.budget_images,
            "counted_s": round(counted, 3), "validation_s": round(self.val_s_total, 3),
            "steps": self.step, "planned_steps": plan.total_steps, "images_seen": plan.images_until(self.step),
            "replans": len(plan.replans), "nan_skipped": self.nan_total, "compile_s": round(self.compile_s, 3),
            "device_name": self.device_name(), "backend": self.backend, "recipe": cfg.run.recipe,
            "model": cfg.model.name, "stages": stages,
        }


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, log=None,
          ignored_flags=()) -> dict:
    return Trainer(cfg, resume=resume, overwrite=overwrite, log=log, ignored_flags=ignored_flags).run()
