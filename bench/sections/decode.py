"""bench section 'decode': images/s per CPU core that FFCV and DALI (CPU) decode from our shards, training crop.

Metrics:
  decode/{ffcv,dali_cpu}_images_per_core_s@{64,96,128,160,224}
      make_loader(train=True: RandomResizedCrop + flip, as in training) on the CPU, ONE loader worker,
      batch BATCH, steady state (loader build, FFCV's compile and the first batches excluded): images per
      CPU second of this process and its children, i.e. what one core delivers, however busy the shared
      machine is. fastvit.data.feed reads these (the planner multiplies by the workers it will have).
  decode/{ffcv,dali_cpu}_images_per_s@{res}: the same run's images per wall second (one worker).

Data: ctx.data (--data) when it stores every resolution of RES, else ctx.src (--src, a JPEG tree) or
../shared/data/imagenet-sample (real full-size ImageNet JPEGs) prepared into ctx.workdir at RES (cached;
the cache is reused only for the same source), else a generated demo tree with
256-500 px images (so the 224 px shard, stored at 256 px, is a real downscale).
"""
from __future__ import annotations

import logging
from pathlib import Path

from . import SHARED_DATA, SectionSkipped

RES = (64, 96, 128, 160, 224)
QUICK_RES = (64, 128)
BATCH = 64


def _dataset(ctx):
    from fastvit.data import open_dataset

    from .loader import prepped

    if ctx.data:
        ds = open_dataset(ctx.data)
        missing = sorted(set(QUICK_RES if ctx.quick else RES) - set(ds.resolutions))
        if missing:
            raise SectionSkipped(f"--data {ctx.data} stores no shards at {missing} px (prep it with --res "
                                 f"{','.join(map(str, RES))})")
        return ds, str(ctx.data)
    real = Path(ctx.src) if ctx.src else SHARED_DATA / "imagenet-sample"
    if real.is_dir():
        src, desc, out = real, f"{real} (JPEG tree)", ctx.workdir("decode-data")
    else:
        from fastvit.data_prep.demo import make_demo_dataset

        src = make_demo_dataset(ctx.workdir("decode-demo-src"), num_classes=10, train_per_class=40 if ctx.quick else 100,
                                val_per_class=0, min_side=256, max_side=500)
        desc, out = "synthetic demo tree (256-500 px)", ctx.workdir("decode-data-demo")
    return prepped(src, out, RES, ctx.workers), desc


def run(ctx) -> dict[str, float]:
    from fastvit.data import installed

    from .loader import _images_per_s

    backends = [(b, name) for b, name in (("ffcv", "ffcv"), ("dali", "dali_cpu")) if installed(b)]
    if not backends:
        raise SectionSkipped("needs FFCV or DALI (neither is installed)")
    logging.getLogger("fastvit.data").setLevel(logging.WARNING)
    ds, desc = _dataset(ctx)
    batches, warmup = (8, 3) if ctx.quick else (40, 6)
    print(f"  data: {desc} ({ds.count('train')} train images), batch {BATCH}, 1 worker, {batches} batches", flush=True)
    out: dict[str, float] = {}
    for backend, name in backends:
        for res in (QUICK_RES if ctx.quick else RES):
            wall, per_cpu = _images_per_s(ds, backend, res, "cpu", 1, batches, warmup)
            out[f"decode/{name}_images_per_core_s@{res}"] = per_cpu
            out[f"decode/{name}_images_per_s@{res}"] = wall
            ctx.save_partial(out)
    for name in [n for b, n in (("ffcv", "ffcv"), ("dali", "dali_cpu")) if not installed(b)]:
        ctx.skip(f"decode/{name}_images_per_core_s", "not installed")
    return out
