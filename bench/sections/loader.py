"""bench section 'loader': images/s of every backend, FFCV vs the torchvision baseline, stall at a stage switch.

Metrics (CPU machine; GPU ones are reported as skipped there):
  loader/{ffcv,dali_cpu,torchvision,resident_cpu}_images_per_s@{64,128,224}
      steady-state images/s of make_loader(train=True) at batch BATCH, `ctx.workers` workers, consumer
      that only takes the batch; loader build and the first batches (FFCV compile, worker start) excluded.
      resident_cpu = the GPU-resident path run on host tensors (one decode, then batched crops).
  loader/{...}_images_per_cpu_s@{res}: the same images per CPU second (this process + its workers),
      which other jobs on shared cores do not distort.
  loader/ffcv_over_torchvision@64 (and _cpu_time@64)
      FFCV reading the 64 px shard / torchvision decoding the source JPEGs with RandomResizedCrop(64),
      same workers, same batch size (target >= 10x).
  loader/switch_stall_over_median_step[_ffcv]
      CurriculumLoader 64 -> 128 with a consumer that sleeps STEP_S per batch: the worst data wait in the
      5 steps around the switch over the median step time (target <= 1.5). DALI always; FFCV (whose
      next-stage numba compile runs in the background) in the full run, with a first stage long enough
      to hide the compile.
  loader/{ffcv,dali,gpu_resident}_cuda_images_per_s@{64,128,224} on a GPU machine.

Data: ctx.data (a fastvit-prep OUT; torchvision reads the source the manifest records), else
../shared/data/imagenette2-224 prepared into ctx.workdir at 64/128/224 (cached; --quick uses a
1,024-image subset), else a generated demo tree.
"""
from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path

from . import SHARED_DATA, SectionSkipped

RES = (64, 128, 224)
BATCH = 64
STEP_S = 0.05  # the switch benchmark's consumer: a fixed "training step" per batch
QUICK_IMAGES = 1024


def _subset_tree(src: Path, root: Path, n: int) -> Path:
    """root/train/<class>/<file> symlinks to every k-th image of src/train (rebuilt if missing)."""
    if (root / "train").is_dir():
        return root
    files = sorted(p for p in (src / "train").rglob("*") if p.is_file())
    step = max(1, len(files) // n)
    for p in files[::step][:n]:
        d = root / "train" / p.parent.name
        d.mkdir(parents=True, exist_ok=True)
        os.symlink(p.resolve(), d / p.name)
    return root


def _dataset(ctx):
    """(PreppedDataset, description)."""
    from fastvit.data import open_dataset

    if ctx.data:
        return open_dataset(ctx.data), ctx.data
    real = SHARED_DATA / "imagenette2-224"
    if real.is_dir():
        if ctx.quick:
            src, desc = _subset_tree(real, ctx.workdir("loader-src-quick"), QUICK_IMAGES), f"{real} ({QUICK_IMAGES}-image subset)"
            out = ctx.workdir("loader-data-quick")
        else:
            src, desc, out = real, str(real), ctx.workdir("loader-data")
    else:
        from fastvit.data_prep.demo import make_demo_dataset

        src = ctx.workdir("loader-demo-src")
        make_demo_dataset(src, num_classes=10, train_per_class=100 if ctx.quick else 300, val_per_class=10)
        desc, out = "synthetic demo tree", ctx.workdir("loader-data-demo")
    return prepped(src, out, RES, ctx.workers), desc


def prepped(src: Path, out: Path, resolutions, workers: int):
    """open_dataset(out) of SRC's train split prepared at `resolutions` (ffcv + dali): a complete earlier
    prep of the same source with those resolutions is reused as is; anything else there (an older
    format, other settings, an interrupted run) is replaced."""
    from fastvit import manifest
    from fastvit.data import DataError, open_dataset
    from fastvit.data_prep import prep_dataset

    if manifest.path_of(out).is_file():
        try:
            ds = open_dataset(out)
            if set(resolutions) <= set(ds.resolutions) and (ds.src is None or ds.src.resolve() == Path(src).resolve()):
                return ds
        except DataError:
            pass
    prep_dataset(src, out, resolutions=list(resolutions), formats=("ffcv", "dali"), splits=("train",), quality=90,
                 workers=workers, progress=False, max_bad=1.0, overwrite=True)
    return open_dataset(out)


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process (all threads) and its live children (DataLoader workers)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for c in me.children(recursive=True):
        try:
            total += sum(c.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def _images_per_s(ds, backend: str, res: int, device: str, workers: int, batches: int, warmup: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second) in steady state."""
    from fastvit.data import make_loader

    it = make_loader(ds, "train", res=res, batch_size=BATCH, backend=backend, device=device, seed=0, workers=workers)
    try:
        for _ in range(warmup):
            it.next_batch()
        if device == "cuda":
            import torch

            torch.cuda.synchronize()
        c0, t0 = _cpu_seconds(), time.perf_counter()
        n = 0
        for _ in range(batches):
            images, _ = it.next_batch()
            n += images.shape[0]
        if device == "cuda":
            torch.cuda.synchronize()
        dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        return n / dt, n / max(cpu, 1e-9)
    finally:
        it.close()


def _switch_stall(ds, backend: str, device: str, workers: int, first_steps: int, second_steps: int) -> float:
    """Worst data wait in the 5 steps around the 64 -> 128 switch / median step time."""
    from fastvit.data import CurriculumLoader, Stage

    stages = [Stage(64, BATCH, first_steps), Stage(128, BATCH, second_steps)]
    step_times = []
    with CurriculumLoader(ds, stages, backend=backend, device=device, seed=0, workers=workers) as cl:
        for _ in cl:
            time.sleep(STEP_S)  # the "training step"
        waits = list(cl.data_wait_s)                      # the most recent steps (a bounded window)
        switch = cl.switch_steps[1] - (cl.step - len(waits))   # the switch's index in that window
    step_times = [w + STEP_S for w in waits[1:]]  # step 0 includes the first build: not a step
    around = waits[max(1, switch - 2):switch + 3]
    return max(around) / statistics.median(step_times)


def run(ctx) -> dict[str, float]:
    from fastvit.data import installed

    missing = [b for b in ("ffcv", "dali") if not installed(b)]
    if missing:
        raise SectionSkipped(f"needs FFCV and DALI ({', '.join(missing)} not installed)")
    logging.getLogger("fastvit.data").setLevel(logging.WARNING)
    ds, desc = _dataset(ctx)
    print(f"  data: {desc} ({ds.count('train')} train images), batch {BATCH}, {ctx.workers} workers", flush=True)
    has_src = ds.src is not None and (ds.src / "train").is_dir()
    workers = ctx.workers
    batches, warmup = (16, 4) if ctx.quick else (48, 6)
    out: dict[str, float] = {}
    resolutions = (64,) if ctx.quick else RES

    cpu_backends = [("ffcv", "ffcv"), ("dali", "dali_cpu"), ("torchvision", "torchvision"), ("gpu_resident", "resident_cpu")]
    if ctx.quick:
        cpu_backends = cpu_backends[:3]
    for res in resolutions:
        for backend, name in cpu_backends:
            if backend == "torchvision" and not has_src:
                ctx.skip(f"loader/torchvision_images_per_s@{res}", "the dataset's manifest records no readable source tree")
                continue
            wall, per_cpu = _images_per_s(ds, backend, res, "cpu", workers, batches, warmup)
            out[f"loader/{name}_images_per_s@{res}"] = wall
            out[f"loader/{name}_images_per_cpu_s@{res}"] = per_cpu
    if "loader/torchvision_images_per_s@64" in out:
        out["loader/ffcv_over_torchvision@64"] = out["loader/ffcv_images_per_s@64"] / out["loader/torchvision_images_per_s@64"]
        # The same ratio in CPU time: what it costs, independent of other jobs sharing the cores.
        out["loader/ffcv_over_torchvision_cpu_time@64"] = (out["loader/ffcv_images_per_cpu_s@64"]
                                                           / out["loader/torchvision_images_per_cpu_s@64"])

    n_batches = ds.count("train") // BATCH
    switch = ds.stored_res(64, "train", "dali") != ds.stored_res(128, "train", "dali")
    if not switch:  # one shard serves both stages: the loader never switches (e.g. --data prepped at 32,64)
        ctx.skip("loader/switch_stall_over_median_step*", f"{ds.root} stores no separate shards for 64 and 128 px "
                 f"(prep it with --res 64,128,224)")
    else:
        out["loader/switch_stall_over_median_step"] = _switch_stall(ds, "dali", "cpu", workers,
                                                                    first_steps=max(20, n_batches + 5), second_steps=20)
    if switch and not ctx.quick:
        # FFCV's next stage compiles for ~10-40 s here: the first stage must last longer than that.
        out["loader/switch_stall_over_median_step_ffcv"] = _switch_stall(ds, "ffcv", "cpu", workers,
                                                                         first_steps=int(60 / STEP_S), second_steps=20)

    if ctx.cuda:
        for res in resolutions:
            for backend in ("ffcv", "dali", "gpu_resident"):
                out[f"loader/{backend}_cuda_images_per_s@{res}"] = _images_per_s(ds, backend, res, "cuda", workers,
                                                                                 batches * 4, warmup)[0]
        if switch:
            out["loader/switch_stall_over_median_step_cuda"] = _switch_stall(ds, "dali", "cuda", workers,
                                                                             first_steps=max(20, n_batches + 5),
                                                                             second_steps=20)
    else:
        for backend in ("ffcv", "dali", "gpu_resident"):
            ctx.skip(f"loader/{backend}_cuda_images_per_s@64,128,224", "needs a CUDA GPU (DALI mixed decode, GPU-resident crops)")
    return out
