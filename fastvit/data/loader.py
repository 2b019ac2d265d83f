"""`make_loader`: one backend, one split, batches of uint8 (B,3,r,r) + int64 (B,) labels on the device.

    it = make_loader(ds, split="train", res=128, batch_size=256, backend="ffcv", device="cuda", seed=0)
    for images, labels in it: ...      # one epoch per pass
    len(it)                            # batches per epoch
    it = make_val_loader(ds, res=224, batch_size=500, backend="dali")   # center crop, one fixed order, all images
    it = make_val_loader(source, res=224, batch_size=500)   # a DataSource resolved once (fastvit.data.source)

Shard choice: a loader at res r reads the stored resolution r' = the smallest >= r (else the
largest), logged once. The order of batch g is BatchPlan's (seeded permutation per epoch), shared by
all backends; `start_batch=g` starts at global batch g (epoch g // len, batch g % len) without
decoding anything before it.
"""
from __future__ import annotations

from typing import Sequence

from fastvit.stage import Stage

from ..sysinfo import default_workers
from .backends import AUTO
from .base import BatchLoader, LoaderOptions
from .dataset import DataError, PreppedDataset, log_choice_once
from .order import BatchPlan
from .source import DataSource, source_of


def build_loader(source: DataSource, split: str, stages: Sequence[Stage], seeds: Sequence[int], *, train: bool,
                 seed: int, workers: int | None, drop_last: bool, start_batch: int = 0,
                 opts: LoaderOptions) -> BatchLoader:
    """A loader over a plan of one or more stages that share one stored shard (CurriculumLoader's unit);
    stage k's batch order is seeded `seeds[k]`, the last stage is endless (the caller decides the end).
    `source` is trusted as resolved: its backend, device and container are not checked again."""
    ds, backend, dev = source.ds, source.backend, source.device
    workers = default_workers() if workers is None else int(workers)
    if workers < 0:
        raise DataError("workers must be >= 0")
    # Training: a new permutation per epoch. Evaluation: one fixed permutation (see epoch_order).
    shuffle = False if opts.order == "sequential" else (True if train else "fixed")
    res0 = stages[0].res
    if backend == "torchvision":
        from .backend_torchvision import TorchvisionLoader, open_image_folder

        folder = open_image_folder(ds, split, res0, train, opts.aug, opts.src)
        plan = _plan(len(folder), stages, seeds, drop_last=drop_last, shuffle=shuffle, opts=opts)
        log_choice_once(backend, split, res0, res0)
        return TorchvisionLoader(folder, plan, dev, workers=workers, train=train, opts=opts, seed=seed,
                                 classes=ds.classes, start_batch=start_batch)

    fmt = source.container(split)  # gpu_resident: whichever container the split has
    if fmt == "any":
        raise DataError(f"{ds.root}: split {split!r} has no ffcv or dali files")
    stored = ds.stored_res(max(s.res for s in stages), split, fmt)
    for s in stages:
        log_choice_once(backend, split, s.res, stored)
    plan = _plan(ds.count(split), stages, seeds, drop_last=drop_last, shuffle=shuffle, opts=opts)
    if backend == "ffcv":
        from .backend_ffcv import FFCVLoader

        return FFCVLoader(ds.ffcv_path(split, stored), plan, dev, workers=max(1, workers), train=train, opts=opts,
                          start_batch=start_batch, aug=opts.aug)
    if backend == "dali":
        from .backend_dali import DALILoader

        tars, idxs = ds.dali_shard(split, stored)
        return DALILoader(tars, idxs, plan, dev, workers=max(1, workers), train=train, opts=opts, seed=seed,
                          start_batch=start_batch, aug=opts.aug)
    from .backend_resident import ResidentLoader

    return ResidentLoader(ds, split, stored, plan, dev, workers=max(1, workers), train=train, opts=opts,
                          start_batch=start_batch, aug=opts.aug)


def _plan(n: int, stages, seeds, *, drop_last: bool, shuffle, opts: LoaderOptions) -> BatchPlan:
    """The loader's endless BatchPlan; this rank's share of each batch under torchrun (opts.shard)."""
    rank, world = opts.shard
    return BatchPlan(n, stages, seeds, endless=True, drop_last=drop_last, shuffle=shuffle,
                     res_fn=opts.res_schedule, rank=rank, world=world)


def make_loader(ds: PreppedDataset | DataSource, split: str = "train", res: int = 128, batch_size: int = 256,
                backend: str = AUTO, device="cuda", train: bool = True, seed: int = 0,
                workers: int | None = None, drop_last: bool = True, *, start_batch: int = 0,
                **options) -> BatchLoader:
    """Batches of (uint8 (B,3,res,res), int64 (B,)) on `device`, one epoch per pass.

    `ds`: a PreppedDataset with `backend` and `device` (resolved here: fastvit.data.source), or a
    DataSource resolved before (used as it is). train=True: random-resized-crop + flip, shuffled per
    epoch; train=False: center crop, in one fixed order (the crops: fastvit.augspec.AugSpec, option
    aug=). Options: see LoaderOptions (src=, order=, batches_ahead=, ffcv_jit=, hw_decoder_load=,
    dali_reader=, gpu_mem_share=, res_schedule=, aug=).
    """
    opts = LoaderOptions.from_kwargs(options)
    if res <= 0 or batch_size <= 0:
        raise DataError("res and batch_size must be positive")
    # "auto" chooses the best backend installed that reads (split, res); a named one is checked by its build
    source = source_of(ds, backend, device, [(split, int(res))] if backend in (None, AUTO) else (), src=opts.src)
    stage = Stage(res=int(res), batch_size=int(batch_size))
    return build_loader(source, split, [stage], [int(seed)], train=train, seed=seed, workers=workers,
                        drop_last=drop_last, start_batch=start_batch, opts=opts)


def make_val_loader(ds: PreppedDataset | DataSource, res: int, batch_size: int, backend: str = AUTO, device="cuda",
                    split: str = "val", workers: int | None = None, **options) -> BatchLoader:
    """Every image of `split` once per pass, in one fixed shuffled order (the same every pass: a capped
    evaluation sees a uniform sample), center crop (AugSpec.val_crop) resized to res."""
    return make_loader(ds, split=split, res=res, batch_size=batch_size, backend=backend, device=device,
                       train=False, seed=0, workers=workers, drop_last=False, **options)
