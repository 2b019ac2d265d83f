"""FFCV backend: one `ffcv.loader.Loader` over ffcv/{split}_{r'}.beton per (res, batch size).

Train: RandomResizedCropRGBImageDecoder((r, r), aug.scale, aug.ratio) + RandomHorizontalFlip(aug.flip).
Val: CenterCropRGBImageDecoder((r, r), aug.val_crop). Then ToTensor -> ToDevice(non_blocking) -> ToTorchImage.
The decoder's output size is baked into the compiled (numba) pipeline, so a new size needs a new
Loader: the CurriculumLoader builds it in the background.

The order comes from BatchPlan through a TraversalOrder (`_PlanOrder`), which is what makes
"same seed -> same order" hold across backends and lets a resumed run skip whole batches for free.
Under torchrun that order is this rank's share (BatchPlan.rank_epoch_order) at batch B / world: FFCV's
own `distributed=True` splits its order differently from the other backends, so it is not used.
"""
from __future__ import annotations

import threading
from typing import Iterator

import torch

from ..augspec import DEFAULT_AUG, AugSpec
from ..compat import ffcv_compiled_code, ffcv_order_instance, ffcv_signal_stop, ffcv_start_epoch, ffcv_stop_epoch
from .base import BatchLoader, LoaderOptions
from .dataset import DataError
from .order import RANK_SEED_STRIDE, BatchPlan
from .shards import open_beton

_COMPILER_LOCK = threading.Lock()  # Compiler.set_enabled is global FFCV state
# Compiled pipelines of closed loaders. numba's dispatcher finalizer raises (KeyError, printed as
# "Exception ignored") when FFCV's literal-typed overloads are garbage collected; keeping the few
# compiled stage pipelines of a run alive avoids that noise for a few MB.
_RETIRED_CODE: list = []


def _make_order(plan: BatchPlan, quasi: bool):
    """A TraversalOrder *instance* FFCV can take: Loader calls `order(loader)` on instances it is given."""
    from ffcv.traversal_order import QuasiRandom
    from ffcv.traversal_order.base import TraversalOrder

    class _Skip:
        skip = 0  # samples to drop once from the next epoch's order (a resumed epoch)

        def __call__(self, loader):
            (QuasiRandom if quasi else TraversalOrder).__init__(self, loader)
            return self

        def _take_skip(self, order):
            skip, self.skip = self.skip, 0
            return order[skip:]

    class PlanOrder(_Skip, TraversalOrder):
        """Epoch e of the plan's (single) stage, exactly as BatchPlan computes it."""

        def sample_order(self, epoch: int):
            return self._take_skip(plan.rank_epoch_order(0, epoch))   # this rank's share (all of it: world 1)

    class QuasiOrder(_Skip, QuasiRandom):
        """FFCV's page-local shuffle (for datasets much larger than RAM); its own seed scheme."""

        def sample_order(self, epoch: int):
            return self._take_skip(QuasiRandom.sample_order(self, epoch))

    cls = QuasiOrder if quasi else PlanOrder
    return ffcv_order_instance(cls)


class FFCVLoader(BatchLoader):
    backend = "ffcv"

    def __init__(self, path, plan: BatchPlan, device: torch.device, *, workers: int, train: bool,
                 opts: LoaderOptions, start_batch: int = 0, aug: AugSpec = DEFAULT_AUG):
        super().__init__(plan, device, start_batch=start_batch, train=train)
        if len(plan.stages) != 1 or plan.res_fn is not None:
            raise DataError("the ffcv backend compiles one output size per loader: no res_schedule")
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader
        from ffcv.pipeline.compiler import Compiler
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

        st = plan.stages[0]
        r = st.res
        img_field, lab_field = open_beton(path, columns=False).field_names()
        on_gpu = device.type == "cuda"
        if train:
            decode = [RandomResizedCropRGBImageDecoder((r, r), scale=aug.scale, ratio=aug.ratio),
                      RandomHorizontalFlip(aug.flip)]
        else:
            decode = [CenterCropRGBImageDecoder((r, r), ratio=aug.val_crop)]
        # GPU: ToTorchImage(channels_last=False), a device copy to contiguous NCHW like the other backends.
        # CPU: the channels_last view (same shape and values, NHWC strides): a host copy here is a torch
        # OpenMP op per batch whose spinning threads starve FFCV's own decode threads (5-8x slower on 2 cores).
        image_pipe = decode + [ToTensor()] + ([ToDevice(device, non_blocking=True)] if on_gpu else []) + \
            [ToTorchImage(channels_last=not on_gpu)]
        label_pipe = [IntDecoder(), ToTensor(), Squeeze()] + ([ToDevice(device, non_blocking=True)] if on_gpu else [])

        quasi = opts.order == "quasi_random"
        if quasi and plan.world > 1:
            raise DataError("order='quasi_random' (FFCV's own page-local order) is single-process; "
                            "use order='random' under torchrun")
        self._order = _make_order(plan, quasi)
        os_cache = False if quasi else opts.os_cache  # quasi-random order is for FFCV's own page cache
        with _COMPILER_LOCK:
            was = Compiler.is_enabled
            Compiler.set_enabled(opts.ffcv_jit)
            try:
                self._loader = Loader(str(path), batch_size=plan.local_batch_size(st), num_workers=workers,
                                      os_cache=os_cache, order=self._order, seed=(plan.seeds[0] + RANK_SEED_STRIDE * plan.rank) % (1 << 20),
                                      drop_last=plan.drop_last, batches_ahead=opts.batches_ahead,
                                      pipelines={img_field: image_pipe, lab_field: label_pipe})
            finally:
                Compiler.set_enabled(was)
        if len(self._loader) != plan.batches_per_epoch(0):
            raise DataError(f"{path}: {len(self._loader)} batches per epoch, the plan expects {plan.batches_per_epoch(0)} "
                            f"(the .beton and the manifest disagree on the sample count)")
        self._ahead = max(1, opts.batches_ahead)
        self._epoch_iters: list = []

    def _start_epoch(self, epoch: int, skip_batches: int):
        self._order.skip = skip_batches * self.plan.local_batch_size(self.plan.stages[0])
        it = ffcv_start_epoch(self._loader, epoch)  # an EpochIterator thread starts decoding right away
        self._epoch_iters.append(it)
        return it

    def _open_stream(self, g: int) -> Iterator:
        plan = self.plan
        nb = plan.batches_per_epoch(0)
        total = plan.total_steps
        epoch, b = divmod(g, nb)
        cur = self._start_epoch(epoch, b)
        nxt = None
        while True:
            remaining = nb - b
            # Start the next epoch's decode while this one drains, so its first batch is waiting.
            more = total is None or (epoch + 1) * nb < total
            if nxt is None and more and remaining <= self._ahead:
                nxt = self._start_epoch(epoch + 1, 0)
            batch = next(cur)
            yield batch
            b += 1
            if b == nb:
                self._finish(cur)
                epoch, b = epoch + 1, 0
                cur, nxt = (nxt if nxt is not None else self._start_epoch(epoch, 0)), None

    def _finish(self, it) -> None:
        ffcv_stop_epoch(it)  # all its batches were consumed; what is left in its queue is the end marker
        if it in self._epoch_iters:
            self._epoch_iters.remove(it)

    def _close_stream(self) -> None:
        for it in self._epoch_iters:
            ffcv_signal_stop(it)  # all at once, then wait for each
        for it in self._epoch_iters:
            ffcv_stop_epoch(it)
        self._epoch_iters = []
        if self._loader is not None and ffcv_compiled_code(self._loader) is not None:
            _RETIRED_CODE.append(ffcv_compiled_code(self._loader))
        self._loader = None
