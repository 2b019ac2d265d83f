"""The worker side of a prep run: transcode chunks of images on a process pool, results in order.

    for results in ordered_map(transcode_chunk, tasks, workers, window): ...
"""
from __future__ import annotations

import os
import sys
from collections import deque
from typing import Iterable, Iterator

from . import codec
from .options import PrepError
from .wds import sample_blob


def transcode_chunk(task: tuple) -> list[tuple]:
    """Worker: [(src_index, path, key, label)] -> per image (src_index, orig_size, [(w, h, jpeg_len,
    cls_len, tar blob)] per resolution) or (src_index, None, reason). The tar members are built here,
    in parallel, so the main process only appends bytes."""
    items, resolutions, size_ratio, quality, use_tj, passthrough = task
    out = []
    for idx, path, key, label in items:
        try:
            with open(path, "rb") as f:
                data = f.read()
            t = codec.transcode(data, resolutions, size_ratio, quality, use_tj, passthrough)
            res = []
            for (w, h, jpeg), kept in zip(t.outputs, t.kept):
                blob, cls_len = sample_blob(key, jpeg, label)
                res.append((w, h, len(jpeg), cls_len, blob, kept))
            out.append((idx, t.orig_size, res))
        except codec.BadImage as e:
            out.append((idx, None, str(e)))
        except OSError as e:
            out.append((idx, None, f"cannot read ({e.strerror or e})"))
        except Exception as e:  # one bad image never aborts the run; it is listed with the reason
            out.append((idx, None, f"cannot decode ({type(e).__name__}: {e})"))
    return out


LOCK_FD: int | None = None  # OUT's lock, held by the main process (set by prep._lock)
_PR_SET_PDEATHSIG = 1


def worker_init(parent: int | None = None) -> None:
    import gc
    import signal

    # First: move every object inherited from the main process (its source list, the records of the
    # shards done so far) out of this worker's garbage collection. Collecting them would write to their
    # headers and copy their pages: measured 0.33 KB per image per worker (~0.4 GB per worker at
    # ImageNet's size), bench/results/scale/README.md. freeze() splices lists, it touches no object.
    gc.freeze()

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (no worker tracebacks)
    if LOCK_FD is not None:  # a forked copy of the lock must not outlive the main process
        try:
            os.close(LOCK_FD)
        except OSError:
            pass
    if sys.platform.startswith("linux"):
        # die with the main process (kill -9 included) instead of lingering as orphans
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
        if parent is not None and os.getppid() != parent:  # it died before prctl took effect
            os._exit(1)
    if codec.cv2 is not None:
        codec.cv2.setNumThreads(1)  # one process per core already


def ordered_map(fn, tasks: Iterable, workers: int, window: int) -> Iterator:
    """fn over tasks in order, on `workers` processes, with at most `window` tasks in flight."""
    if workers <= 1:
        if codec.cv2 is not None:
            codec.cv2.setNumThreads(1)
        for t in tasks:
            yield fn(t)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # fork (Linux), as FFCV's DatasetWriter and torch's DataLoader do: workers start instantly and,
    # unlike spawn/forkserver, never re-import the caller's __main__ (a script calling prep_dataset
    # without a __main__ guard would otherwise recurse). Workers only run Pillow/OpenCV/TurboJPEG code,
    # and we start no thread before forking (our progress bar runs without tqdm's monitor thread).
    # An executor rather than mp.Pool: a worker killed by the OOM killer raises BrokenProcessPool here
    # instead of hanging the run forever.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    ex = ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=worker_init,
                             initargs=(os.getpid(),))
    ok = False
    try:
        pending: deque = deque()
        it = iter(tasks)
        for t in it:
            pending.append(ex.submit(fn, t))
            if len(pending) >= window:
                break
        while pending:
            try:
                r = pending.popleft().result()
            except BrokenProcessPool:
                raise PrepError("a worker process died (out of memory?); rerun the same command to resume",
                                exit_code=1) from None
            nxt = next(it, None)
            if nxt is not None:
                pending.append(ex.submit(fn, nxt))
            yield r
        ok = True
    finally:
        if not ok:  # interrupted or failed: stop the workers now rather than after their current chunk
            for proc in list((getattr(ex, "_processes", None) or {}).values()):
                proc.terminate()
        ex.shutdown(wait=ok, cancel_futures=True)
