"""DALI backend: webdataset shards -> decode (+ random crop) -> resize -> flip -> uint8 NCHW on the device.

The output size of every batch is computed *inside* the pipeline from the batch's iteration index: a
batch-mode `fn.external_source` callback gets `BatchInfo.iteration` and returns, per sample, the size
`BatchPlan.batch(g).res` (and, with the default `dali_reader="index"`, the JPEG bytes and labels of
the plan's batch g). DALI calls that callback when it *schedules* batch g, however far its prefetch
queue runs ahead, so a size change lands on exactly the planned batch with no pipeline rebuild.
The batch size may change too (external_source batches can be smaller than max_batch_size).

dali_reader="index" (default) reads the tars through their .idx files in BatchPlan order: exact
epochs (every sample once), the same order as the other backends, free resume.
dali_reader="webdataset" uses stock `fn.readers.webdataset(index_paths=...)`: DALI's own reader with
its shuffle buffer (`initial_fill`); its epochs are approximate (the buffer mixes neighbouring epochs)
and it keeps one batch size. Under torchrun the index reader serves this rank's share of every batch
(BatchPlan), the stock reader DALI's own `shard_id`/`num_shards` split.

Device: "cuda" -> decoders with device="mixed" (nvJPEG; the A100/H100 hardware decoder takes
`hw_decoder_load` of the images); "cpu" -> device_id=None and CPU decoders (how the tests run).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ..augspec import DEFAULT_AUG, AugSpec
from ..compat import shutdown_dali_pipeline
from .base import BatchLoader, LoaderOptions
from .dataset import DataError
from .order import BatchPlan
from .shards import WdsShard

LABEL_BYTES = 12  # stock reader: .cls bytes padded to this many ASCII digits


class _PlanSource:
    """external_source callback: batch g = g0 + iteration -> (jpegs?, labels?, sizes (bs, 2) float32)."""

    def __init__(self, plan: BatchPlan, g0: int, shard: WdsShard | None, train: bool, aug: AugSpec = DEFAULT_AUG):
        self.plan, self.g0, self.shard, self.train, self.aug = plan, g0, shard, train, aug
        self.calls = []  # (iteration, res, bs) as scheduled: lets tests see how far DALI ran ahead

    def spec(self, iteration: int):
        g = self.g0 + iteration
        total = self.plan.total_steps
        if total is not None and g >= total:  # prefetch past the end of the plan: never consumed
            g = total - 1
        return self.plan.batch(g)

    def __call__(self, info):
        spec = self.spec(info.iteration)
        bs, r = len(spec.indices), spec.res
        self.calls.append((info.iteration, r, bs))
        if self.train:
            geometry = (np.full((bs, 2), r, dtype=np.float32),)
        else:  # val: resize the shorter side to aug.val_resize(r) (r*256/224), then center-crop r
            geometry = (np.full((bs,), self.aug.val_resize(r), dtype=np.float32), np.full((bs,), r, dtype=np.float32))
        if self.shard is None:
            return geometry
        jpegs = [self.shard.jpeg(i) for i in spec.indices]
        labels = self.shard.labels[spec.indices]
        return (jpegs, labels) + geometry


def _build_pipeline(source: _PlanSource, *, tars, idxs, max_batch: int, workers: int, device_id, seed: int,
                    train: bool, opts: LoaderOptions, on_gpu: bool):
    from nvidia.dali import fn, pipeline_def, types

    n_geo = 1 if train else 2

    @pipeline_def
    def pipe():
        if source.shard is not None:
            jpegs, labels, *geo = fn.external_source(source=source, batch=True, batch_info=True, num_outputs=2 + n_geo,
                                                     dtype=[types.UINT8, types.INT64] + [types.FLOAT] * n_geo)
        else:
            jpegs, cls = fn.readers.webdataset(paths=[str(t) for t in tars], index_paths=[str(i) for i in idxs],
                                               ext=["jpg", "cls"], random_shuffle=train,
                                               initial_fill=opts.initial_fill, seed=seed, name="Reader",
                                               shard_id=source.plan.rank, num_shards=source.plan.world)
            labels = fn.pad(cls, fill_value=0, shape=[LABEL_BYTES], axes=[0])  # ASCII digits, parsed in torch
            geo = fn.external_source(source=source, batch=True, batch_info=True, num_outputs=n_geo,
                                     dtype=[types.FLOAT] * n_geo)
        dev = "mixed" if on_gpu else "cpu"
        hw = {"hw_decoder_load": opts.hw_decoder_load} if on_gpu else {}
        if train:
            images = fn.decoders.image_random_crop(jpegs, device=dev, output_type=types.RGB,
                                                   random_area=list(source.aug.scale),
                                                   random_aspect_ratio=list(source.aug.ratio),
                                                   num_attempts=source.aug.attempts, **hw)
            images = fn.resize(images, size=geo[0], antialias=True)
            images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW",
                                              mirror=fn.random.coin_flip(probability=source.aug.flip))
        else:
            images = fn.decoders.image(jpegs, device=dev, output_type=types.RGB, **hw)
            shorter, crop = geo
            images = fn.resize(images, resize_shorter=shorter, antialias=True)
            images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", crop_h=crop, crop_w=crop)
        if on_gpu:
            labels = labels.gpu()
        return images, labels

    return pipe(batch_size=max_batch, num_threads=workers, device_id=device_id, seed=seed,
                prefetch_queue_depth=max(1, opts.batches_ahead))


def parse_ascii_labels(padded: torch.Tensor) -> torch.Tensor:
    """(B, L) uint8 ASCII digits padded with 0 -> (B,) int64."""
    d = padded.to(torch.int64)
    valid = (d >= 48) & (d <= 57)
    digits = torch.where(valid, d - 48, torch.zeros_like(d))
    n = valid.sum(1, keepdim=True)
    pos = torch.arange(d.shape[1], device=d.device).expand_as(d)
    power = torch.where(valid, n - 1 - pos, torch.zeros_like(d))  # digits are left-aligned
    return (digits * torch.pow(10, power)).sum(1)


class DALILoader(BatchLoader):
    backend = "dali"

    def __init__(self, tars, idxs, plan: BatchPlan, device: torch.device, *, workers: int, train: bool,
                 opts: LoaderOptions, seed: int, start_batch: int = 0, aug: AugSpec = DEFAULT_AUG):
        super().__init__(plan, device, start_batch=start_batch, train=train)
        self._tars, self._idxs, self._workers, self._opts, self._seed = tars, idxs, workers, opts, seed
        self._aug = aug
        self._stock = opts.dali_reader == "webdataset"
        if self._stock and len({s.batch_size for s in plan.stages}) != 1:
            raise DataError("dali_reader='webdataset' keeps one batch size; use dali_reader='index'")
        self._shard = None if self._stock else WdsShard(tars, idxs)
        if self._shard is not None and len(self._shard) != plan.n:
            raise DataError(f"{tars[0].parent}: the .idx files list {len(self._shard)} samples, the manifest {plan.n}")
        self._pipe = self._iter = self.source = None

    def _open_stream(self, g: int) -> Iterator:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        on_gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if on_gpu else None
        self.source = _PlanSource(self.plan, g, self._shard, self.train, self._aug)
        # Augmentation seed differs per start point: a resumed run does not replay the crops it already saw.
        # Under torchrun each rank's crops are its own (the rank joins the seed).
        key = [self._seed, g] + ([self.plan.rank] if self.plan.world > 1 else [])
        seed = int(np.random.SeedSequence(key).generate_state(1)[0] & 0x7FFFFFFF)
        self._pipe = _build_pipeline(self.source, tars=self._tars, idxs=self._idxs, max_batch=self.plan.max_batch_size,
                                     workers=self._workers, device_id=device_id, seed=seed, train=self.train,
                                     opts=self._opts, on_gpu=on_gpu)
        self._pipe.build()
        # size=-1: an endless stream; epochs are counted by BatchLoader, so DALI never resets (no
        # re-prefetch at an epoch boundary). prepare_first_batch: build = pre-filled queue.
        self._iter = DALIGenericIterator([self._pipe], ["images", "labels"], size=-1, auto_reset=False,
                                         last_batch_policy=LastBatchPolicy.PARTIAL, prepare_first_batch=True)
        return self._gen(g)

    def _gen(self, g: int) -> Iterator:
        while True:
            out = next(self._iter)[0]
            images, labels = out["images"], out["labels"]
            if self._stock:
                labels = parse_ascii_labels(labels)
            else:
                labels = labels.reshape(-1)
            yield images, labels.to(torch.int64)

    def _close_stream(self) -> None:
        self._iter = None
        if self._pipe is not None:
            shutdown_dali_pipeline(self._pipe)  # joins DALI's worker threads now, not at garbage collection
        self._pipe = None
        if self._shard is not None:
            self._shard.close()
            self._shard = None
