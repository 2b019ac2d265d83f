"""What every backend shares: options, the epoch/stream bookkeeping, clean shutdown.

A backend subclass implements `_open_stream(g)` (an iterator of batches g, g+1, ... in plan order)
and `_close_stream()`. `BatchLoader` turns that into one epoch per `for` pass and `next_batch()` for
the CurriculumLoader, and counts the global batch index so a stream can be reopened (resume).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from fastvit.settings import ConfigError, check_choices, from_dict, setting

from ..augspec import DEFAULT_AUG, AugSpec
from .dataset import DataError
from .order import BatchPlan


@dataclass
class LoaderOptions:
    """Backend knobs beyond make_loader's named arguments (checked against these keys)."""

    src: str | None = setting(None, "source JPEG tree for torchvision, when the manifest lacks it")
    order: str = setting("random", "sample order; quasi_random: FFCV page-local, for data >> RAM",
                         choices=("random", "quasi_random", "sequential"))
    batches_ahead: int = setting(3, "FFCV batches_ahead, DALI prefetch_queue_depth, torchvision prefetch_factor")
    ffcv_jit: bool = setting(True, "FFCV compiles its pipeline (off: plain Python, for debugging and tiny CPU tests)")
    os_cache: bool = setting(True, "FFCV: page cache (on) or its own process cache (quasi_random)")
    hw_decoder_load: float = setting(0.65, "DALI mixed decoder: share of images sent to the hardware JPEG decoder")
    dali_reader: str = setting("index", "DALI reader: index (exact per-epoch permutations) or webdataset "
                               "(stock reader, buffer shuffle)", choices=("index", "webdataset"))
    initial_fill: int = setting(4096, "DALI webdataset reader's shuffle buffer")
    gpu_mem_share: float = setting(0.6, "gpu_resident: decoded shards alive together (the training stage's and "
                                   "the next one filling) take at most this share of the device's (GPU or host) "
                                   "memory; a stage whose shard does not fit streams instead")
    # DALI/gpu_resident: global batch index -> output side (a callable: no flag, not saved in a config)
    res_schedule: Callable[[int], int] | None = setting(None, cli=False)
    # crops and flip, handed by build_loader to every backend (fastvit.augspec; no flag, not saved)
    aug: AugSpec = setting(DEFAULT_AUG, cli=False)
    # (rank, world): this process's share of every batch under torchrun (fastvit.data.order; not saved)
    shard: tuple = setting((0, 1), cli=False)

    def check(self, *, flags: bool = False) -> None:
        """ConfigError on a bad value, naming the key (flags=True: the fastvit-train flag)."""
        check_choices(self, flags=flags)
        if not isinstance(self.aug, AugSpec):
            raise ConfigError(f"aug must be a fastvit.augspec.AugSpec, not {type(self.aug).__name__}")
        rank, world = self.shard
        if not 0 <= rank < world:
            raise ConfigError(f"shard {self.shard}: rank must be in 0..world-1")
        if not 0.0 < self.gpu_mem_share <= 1.0:
            raise ConfigError(f"{'--gpu-mem-share' if flags else 'gpu_mem_share'} must be in (0, 1]")

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "LoaderOptions":
        """Checked options; everything the data package refuses is a DataError, so the one generic
        check's ConfigError is passed on as one (same message)."""
        try:
            opts = from_dict(cls, kwargs, what="loader option")
            opts.check()
        except ConfigError as e:
            raise DataError(str(e)) from None
        return opts


class BatchLoader:
    """One epoch per `for` pass over (images uint8 (B,3,r,r) on device, labels int64 (B,) on device)."""

    backend = "?"

    def __init__(self, plan: BatchPlan, device: torch.device, *, start_batch: int = 0, train: bool = True):
        self.plan = plan
        self.device = device
        self.train = train
        self._g = start_batch      # global index of the next batch handed out
        self._stream: Iterator | None = None
        self.closed = False

    def __len__(self) -> int:
        """Batches per epoch (of the plan's first stage)."""
        return self.plan.batches_per_epoch(0)

    @property
    def next_index(self) -> int:
        return self._g

    def next_batch(self):
        """The next batch in plan order (epochs chained, no pause at their boundary)."""
        if self.closed:
            raise DataError(f"{self.backend} loader is closed")
        total = self.plan.total_steps
        if total is not None and self._g >= total:
            raise StopIteration
        if self._stream is None:
            self._stream = self._open_stream(self._g)
        batch = next(self._stream)
        self._g += 1
        return batch

    def __iter__(self):
        """One epoch (the rest of the current one when a run resumed mid-epoch)."""
        total = self.plan.total_steps
        if total is not None and self._g >= total:
            return
        end = self.plan.epoch_end(self._g)
        while self._g < end:
            yield self.next_batch()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._stream = None
            self._close_stream()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # backend hooks -------------------------------------------------------------------------------
    def _open_stream(self, g: int) -> Iterator:
        raise NotImplementedError

    def _close_stream(self) -> None:
        pass
