"""Everything a run is built from, derived from the config: the data and where it runs (`RunEnv`), and
the trainable parts (model, optimizer, EMA, mixup, drop-path control) (`Parts`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from fastvit.data.dataset import DataError

from .config import TrainConfig
from .dist import SINGLE, DistEnv, local_device, wrap_model
from .errors import TrainError
from .rules import final_resolution


@dataclass
class RunEnv:
    source: object             # fastvit.data.DataSource: data, device, backend, resolved once here (open_env)
    final_res: int             # last training and the evaluation resolution
    amp: bool                  # bf16 autocast
    compile: bool              # torch.compile (one static graph per stage shape)
    dist: DistEnv = SINGLE     # this process's rank and the world size (torchrun; else world 1)

    ds = property(lambda self: self.source.ds)                    # fastvit.data.PreppedDataset
    device = property(lambda self: self.source.device)            # torch.device
    backend = property(lambda self: self.source.backend)          # the loader backend (never "auto")
    backend_why = property(lambda self: self.source.why)          # backend auto: which one and why (one line)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def open_env(cfg: TrainConfig, denv: DistEnv = SINGLE) -> RunEnv:
    """Data, device, backend and final resolution, all checked before any compute (one line each), in
    one fastvit.data.DataSource that the loaders and the evaluator take as it is. Under torchrun on GPUs
    the device is cuda:LOCAL_RANK."""
    from fastvit.data import DataSource

    root = data_root(cfg)
    device = local_device(denv, resolve_device(cfg.run.device))
    ds, final_res = open_data(cfg)
    try:
        # train (every stored resolution) and val at the evaluation resolution readable by the backend,
        # checked before any compute so a missing shard is not found after the whole budget was spent
        source = DataSource.resolve(ds, choose_backend(cfg), device, [("train", None), ("val", final_res)],
                                    src=cfg.data.loader.src)
    except DataError as e:
        raise TrainError(f"--data {root}: {e}", 2) from None
    amp = cfg.run.amp if cfg.run.amp is not None else device.type == "cuda"
    do_compile = cfg.run.compile if cfg.run.compile is not None else device.type == "cuda"
    return RunEnv(source=source, final_res=final_res, amp=amp, compile=do_compile, dist=denv)


def data_root(cfg: TrainConfig) -> str:
    """--data, checked: given and a directory (one line each)."""
    root = cfg.data.root
    if not root:
        raise TrainError("--data is required: a directory written by fastvit-prep", 2)
    if not Path(root).is_dir():
        raise TrainError(f"--data {root} does not exist", 2)
    return root


def open_data(cfg: TrainConfig):
    """(the prepped data set, the final resolution) of --data, one line when it is not a fastvit-prep
    output (open_env's data half; `--dry-run --assume-speed` opens the data without a device)."""
    from fastvit.data import open_dataset

    root = data_root(cfg)
    try:
        ds = open_dataset(root)
        return ds, final_resolution(cfg, ds.resolutions)
    except DataError as e:
        raise TrainError(f"--data {root}: {e}", 2) from None


def resolve_device(device: str | None) -> torch.device:
    """fastvit.data's one device choice (None: cuda when visible), as a one-line usage error."""
    from fastvit.data import resolve_device as data_device

    try:
        return data_device(device)
    except DataError as e:
        raise TrainError(f"--device: {e}", 2) from None


def choose_backend(cfg: TrainConfig) -> str:
    """Default loader: "auto" (fastvit.data.backends.AUTO_ORDER, resolved in open_env once the data is
    open): on a GPU DALI's hardware decode when DALI is installed, else the GPU-resident loader; on a CPU
    DALI (FFCV spends ~40 s compiling each new pipeline with numba on a small CPU, one per curriculum
    stage plus validation, which a few-minute budget cannot afford; DALI builds in about a second), else
    FFCV, else torchvision. The baseline reads the source JPEGs with torchvision (what users would
    otherwise run)."""
    if cfg.run.recipe == "baseline":
        return "torchvision"
    return cfg.data.backend or "auto"


@dataclass
class Parts:
    model: nn.Module           # the module trained and saved
    step_model: nn.Module      # what a step calls: `model`, or its compiled wrapper
    opt: torch.optim.Optimizer
    ema: object | None         # timm ModelEmaV3
    mixup: object              # timm Mixup (parameters drawn per batch; pixels mixed on uint8)
    drop_path: object          # fastvit.models.DropPathRate


# model settings timm's VisionTransformer takes under the same names (the baseline's)
BASELINE_OVERRIDES = {"patch_size", "depth", "embed_dim", "num_heads", "mlp_ratio", "qkv_bias", "class_token"}


def build_parts(cfg: TrainConfig, env: RunEnv, num_classes: int) -> Parts:
    from timm.optim import create_optimizer_v2

    from fastvit.models import DropPathRate, create_baseline, create_model
    from fastvit.compat import raise_recompile_limit

    from .augment import make_mixup

    op, au = cfg.optim, cfg.augment
    dpr = max(au.drop_path)
    over = cfg.model.overrides()                          # patch_size and the ViTConfig fields given
    try:
        if cfg.run.recipe == "baseline":
            bad = sorted(set(over) - BASELINE_OVERRIDES)
            if bad:
                raise ValueError(f"--recipe baseline (timm's ViT) does not take {', '.join(bad)}")
            model = create_baseline(cfg.model.name, num_classes=num_classes, img_size=env.final_res,
                                    drop_path_rate=dpr, **over)
        else:
            model = create_model(cfg.model.name, num_classes=num_classes, drop_path_rate=dpr, **over)
    except (ValueError, TypeError) as e:
        raise TrainError(f"--model {cfg.model.name}: {e}", 2) from None
    model.to(env.device).train()
    # weight decay on weights only: timm's factory skips 1-D params (biases, norms) and the model's
    # no_weight_decay() names (pos_embed, cls_token)
    target = model.model if cfg.run.recipe == "baseline" else model
    # fused AdamW on a GPU: one kernel for all parameters, and its found_inf input lets the step skip a
    # NaN/inf update without a host sync (step.TrainStep's deferred mode)
    fused = {"fused": True} if env.cuda and op.opt.lower() in ("adam", "adamw") else {}
    opt = create_optimizer_v2(target, opt=op.opt, lr=op.lr, weight_decay=op.weight_decay, **fused)
    ema = None
    if op.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=0.999, use_warmup=False)  # decay set per step (step.EmaRate)
    mixup = make_mixup(mixup=au.mixup, cutmix=au.cutmix, label_smoothing=au.label_smoothing,
                       num_classes=num_classes)
    # torchrun: DDP averages the gradients; with --growth a step runs only some blocks
    step_model = wrap_model(model, env.dist, env.device, find_unused=cfg.growth.mode != "none")
    if env.compile:
        # one compiled module for the run, static shapes: every stage shape (and drop-path rate, a
        # guarded constant) is one graph, compiled at its first call: in the planner's probe (counted),
        # or, for a shape made later (an out-of-memory halving mid-run), at its first training step
        raise_recompile_limit(64)
        # (under DDP, dynamo's DDPOptimizer splits the graph at the gradient buckets: no fullgraph)
        step_model = torch.compile(step_model, fullgraph=cfg.run.recipe != "baseline" and not env.dist.enabled,
                                   dynamic=False)
    return Parts(model=model, step_model=step_model, opt=opt, ema=ema, mixup=mixup,
                 drop_path=DropPathRate(model))


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def device_name(env: RunEnv) -> str:
    if env.cuda:
        return torch.cuda.get_device_name(env.device)
    import os

    from fastvit.sysinfo import cpu_model

    return f"cpu: {cpu_model()} ({os.cpu_count()} cores)"
