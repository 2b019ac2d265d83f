"""Ahead-of-time torch.compile for the shapes a run will use.

One graph per (resolution, kept count, batch size, train/eval) -- `dynamic=False` makes every shape
static, so inductor specializes the attention/MLP GEMMs and the scatter/gather for each shape and
never falls back to a slower dynamic-shape kernel or recompiles a shape it has seen. `fullgraph=True`
turns any graph break into an error instead of a silent slowdown.

    cm = compile_model(model, shapes=[(64, 1.0, 512), (128, 0.5, 256)], amp_dtype=torch.bfloat16)
    cm.compile_seconds   # {(64, 1.0, 512, "train"): 41.2, ...}
    logits = cm(images_u8, keep_rate=0.5)   # call it the way it was warmed up (see _keep_kwargs)

Dynamo guards on the call's form as well as on shapes: a `keep_rate=` float, a `keep_idx=` tensor and
no keep argument at all are three different graphs; autocast on/off and the input dtype are too.
Warm-up therefore calls the model exactly as the trainer will:
    keep float  -> model(x, keep_rate=keep)    (None or >= 1.0: model(x), all patches)
    keep int    -> model(x, keep_idx=<(B,keep) indices>)
"""
from __future__ import annotations

import time
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvit.compat import raise_recompile_limit
from fastvit.kernels import sample_keep_indices

Shape = tuple  # (res | (H, W), keep rate float | kept count int | None, batch)


def _keep_kwargs(keep, B: int, N: int, device) -> dict:
    if keep is None or (isinstance(keep, float) and keep >= 1.0):
        return {}
    if isinstance(keep, float):
        return {"keep_rate": keep}
    if isinstance(keep, int) and not isinstance(keep, bool):
        return {"keep_idx": sample_keep_indices(B, N, keep, device)}
    raise ValueError(f"keep must be a keep rate (float), a kept count (int) or None, got {keep!r}")


def compile_model(model: nn.Module, shapes: Iterable[Shape] = (), *, train: bool = True, eval: bool = False,
                  amp_dtype: torch.dtype | None = None, input_dtype: torch.dtype = torch.uint8,
                  mode: str | None = None, device: str | torch.device | None = None) -> nn.Module:
    """torch.compile(model, fullgraph=True, dynamic=False) and compile each shape now.

    For every (res, keep, batch) in `shapes`: in train mode a forward + backward (the backward graph
    is compiled too), in eval mode a no-grad forward, under autocast(amp_dtype) when given, on random
    `input_dtype` images. Gradients are cleared afterwards and the module's train/eval mode restored.
    Returns the compiled module; `.compile_seconds` maps (res, keep, batch, "train"|"eval") to seconds.
    """
    shapes = [tuple(s) for s in shapes]
    modes = [m for m, on in (("train", train), ("eval", eval)) if on]
    raise_recompile_limit(len(shapes) * max(1, len(modes)))
    cm = torch.compile(model, fullgraph=True, dynamic=False, mode=mode)
    params = list(model.parameters())
    device = torch.device(device) if device is not None else params[0].device
    patch = model.cfg.patch_size
    was_training = model.training
    seconds: dict = {}
    try:
        for shape in shapes:
            res, keep, B = shape
            H, W = (res, res) if isinstance(res, int) else tuple(res)
            N = (H // patch) * (W // patch)
            if input_dtype == torch.uint8:
                x = torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8, device=device)
            else:
                x = torch.rand(B, 3, H, W, device=device).to(input_dtype)
            for m in modes:
                kw = _keep_kwargs(keep, B, N, device)
                model.train(m == "train")
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    if m == "train":
                        logits = cm(x, **kw)
                        y = torch.randint(0, max(1, logits.shape[-1]), (B,), device=device)
                        F.cross_entropy(logits.float(), y).backward()
                    else:
                        with torch.no_grad():
                            cm(x, **kw)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[(res, keep, B, m)] = time.perf_counter() - t0
    finally:
        for p in params:
            p.grad = None
        model.train(was_training)
    cm.compile_seconds = seconds
    return cm

