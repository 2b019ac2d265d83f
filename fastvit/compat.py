"""Every use of a dependency's private or undocumented API, one small function each.

Each names the versions it was checked against. Where the private API may disappear, the function
degrades to the documented behaviour (cleanup at garbage collection) or fails with one line that says
which version it expects; pyproject.toml pins where a silent break is likely (timm < 1.1, ffcv == 1.0.2).

Checked against what the project's environment installs: torch 2.14.1, timm 1.0.31, ffcv 1.0.2,
nvidia-dali-cuda130 2.4.0 (the torch attributes below are also in torch 2.4-2.13, unchanged since 1.x).
"""
from __future__ import annotations

import queue
import time

# --------------------------------------------------------------------------------------------- torch


def raise_recompile_limit(n_graphs: int) -> None:
    """Dynamo stops compiling a function after `recompile_limit` (8) graphs and runs it eagerly; a
    curriculum with several resolutions x keep rates x train/eval can need more. torch._dynamo.config
    is not public API: `recompile_limit` / `accumulated_recompile_limit` (torch >= 2.6, checked to
    2.14.1) were `cache_size_limit` / `accumulated_cache_size_limit` before; whichever exists is set."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), n_graphs + 8))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4 * (n_graphs + 8)))


# --------------------------------------------------------------------------------------------- timm


def mixup_params(mix) -> tuple[float, bool]:
    """(lam, use_cutmix) for one batch, drawn by timm's Mixup with its own RNG rule, mix_prob and
    switch_prob: `Mixup._params_per_batch()` (private; timm 0.9-1.0.31). Public Mixup.__call__ would
    also mix the pixels, in place and in floating point, which uint8 batches must not."""
    draw = getattr(mix, "_params_per_batch", None)
    if draw is None:
        import timm

        raise RuntimeError(f"timm {timm.__version__}: Mixup._params_per_batch is gone (fastvit was checked "
                           f"against timm 1.0.x); install timm>=1.0,<1.1")
    return draw()


# --------------------------------------------------------------------------------------------- DALI


def shutdown_dali_pipeline(pipe) -> None:
    """Join a DALI pipeline's worker threads now rather than at garbage collection: the private
    `Pipeline._shutdown()` (what Pipeline.__del__ calls; DALI 1.x-2.4.0 has no public close)."""
    shutdown = getattr(pipe, "_shutdown", None)
    if shutdown is not None:
        shutdown()


# --------------------------------------------------------------------------------------------- torch


def shutdown_dataloader(dl, it=None) -> None:
    """Stop a DataLoader's worker processes and pin-memory thread now, and wait for its queues' feeder
    threads, so none outlives the loader: `_iterator`, `_MultiProcessingDataLoaderIter._shutdown_workers`,
    `_index_queues`, `_worker_result_queue` and multiprocessing's `Queue._thread` (torch 2.14.1).
    Each is looked up with getattr: without them the workers still exit at garbage collection."""
    it = getattr(dl, "_iterator", None) or it
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
        queues = list(getattr(it, "_index_queues", [])) + [getattr(it, "_worker_result_queue", None)]
        for q in queues:
            t = getattr(q, "_thread", None)
            if t is not None:
                t.join(timeout=5)
    if dl is not None:
        dl._iterator = None


# --------------------------------------------------------------------------------------------- FFCV


def ffcv_order_instance(cls):
    """An instance of the TraversalOrder subclass `cls` whose __init__ has not run yet (`cls.__new__`):
    ffcv 1.0.2's Loader calls `order(loader)` on a TraversalOrder instance it is given, so `cls.__call__`
    runs the real __init__(loader) there and returns self."""
    return cls.__new__(cls)


def ffcv_start_epoch(loader, epoch: int):
    """A new EpochIterator (its thread starts decoding at once) for `epoch`: sets the Loader's
    undocumented `next_epoch` (ffcv 1.0.2), which picks the traversal order's epoch."""
    loader.next_epoch = epoch
    return iter(loader)


def ffcv_stop_epoch(it, timeout: float = 10.0) -> None:
    """Stop an ffcv 1.0.2 EpochIterator thread for good: a producer that finished its epoch blocks on
    `output_queue.put(None)` while the queue is full (no timeout there), so drain while joining."""
    it.close()  # terminate_event: a producer waiting to put a batch leaves within 0.5 s
    deadline = time.monotonic() + timeout
    while it.is_alive() and time.monotonic() < deadline:
        try:
            while True:
                it.output_queue.get_nowait()
        except queue.Empty:
            pass
        it.join(0.05)


def ffcv_signal_stop(it) -> None:
    """Ask an EpochIterator to stop without waiting (`terminate_event`, ffcv 1.0.2)."""
    it.terminate_event.set()


def ffcv_compiled_code(loader):
    """The Loader's compiled (numba) pipeline, `Loader.code` (ffcv 1.0.2; None before the first epoch)."""
    return getattr(loader, "code", None)
