"""CurriculumLoader: the plan's stages as one stream of batches, with no stall at a switch.

    cl = CurriculumLoader(ds, [Stage(64, 512, 1000), Stage(128, 256, 500)], backend="dali", device="cuda", seed=0)
    cl = CurriculumLoader(source, stages, seed=0)   # a DataSource resolved once (fastvit.data.source): trusted
    with cl:
        for images, labels, stage in cl: ...     # every stage's steps once, then it stops
    cl.last_wait_s, cl.data_wait_total_s         # seconds the consumer waited for data (last step, all)

The loader is the single source of "what this step trains on": it takes the planner's stages
(fastvit.stage.Stage: res, batch size, steps, keep, ...) and yields each step's Stage object with its
batch. Neighbouring stages with the same (res, batch size) (`Stage.loader_key`; they differ only in
what the model does: keep rate, depth, patch size) are one *stretch* of the batch order: one seed,
epochs continuing across them.

How the switch stays stall-free:
- Consecutive stretches that read the same stored shard form one *span* served by one loader; on
  DALI and the GPU-resident path the output size (and batch size) changes inside that loader at the
  planned batch, no rebuild at all (see backend_dali).
- For the next span a background thread first closes the previous span's loader, then builds
  the next one (FFCV numba compile, DALI pipeline build, shard decode) and pulls its first batch
  (pre-fill). At the boundary the consumer takes that batch: the wait is a hand-over, not a build.
  At most two spans are alive: the current one and the one being built.
- Boundaries may fall mid-epoch: a stretch is a number of steps, its epochs wrap inside it.

Re-plans (`cl.replan(stages)`, the trainer's drift correction, the one way to hand the loader a new
plan) change step counts in place: a span's last stretch is endless in its loader's own BatchPlan (this
class decides where a span ends), so the running loader carries on; only a span whose stretches
changed is rebuilt, in the background.

Order: stretch j draws its batches from BatchPlan with seed stage_seed(seed, j), epochs counted from
the stretch start, whatever the spans; so `start_step=g` (resume) yields exactly the batches an
uninterrupted run yields from step g on, and skipping costs nothing (no batch before g is decoded).
"""
from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fastvit.stage import Stage, step_ranges

from .base import LoaderOptions
from .dataset import DataError, PreppedDataset
from .backends import AUTO
from .loader import build_loader
from .source import DataSource, source_of
from .order import BatchPlan, stage_seed

log = logging.getLogger("fastvit.data")

WAITS_KEPT = 4096   # recent per-step waits kept (data_wait_s); totals cover the whole run


def stretches(stages: Sequence[Stage]) -> list[Stage]:
    """The batch-order stretches of a plan: neighbours with the same loader_key merged (steps summed).
    Only res, batch_size and steps of the result matter."""
    out: list[Stage] = []
    for s in stages:
        if out and out[-1].loader_key == s.loader_key:
            out[-1] = Stage(s.res, s.batch_size, out[-1].steps + s.steps)
        else:
            out.append(Stage(s.res, s.batch_size, s.steps))
    return out


@dataclass(frozen=True)
class Span:
    """Consecutive stretches [first, last] served by one loader."""
    first: int
    last: int
    backend: str
    start_step: int  # global step of the span's first batch
    steps: int


def plan_spans(stretches_: Sequence[Stage], backend: str, stored_of, *, merge: bool = True,
               backend_of=None) -> list[Span]:
    """Group consecutive stretches that one loader can serve (pure: stored_of(res) -> stored res).

    Only loaders whose output size is set per batch (dali, gpu_resident) serve several stretches;
    FFCV compiles one size per loader and torchvision builds one transform.
    """
    spans: list[Span] = []
    step = 0
    for k, st in enumerate(stretches_):
        b = backend_of(k) if backend_of else backend
        if (merge and spans and spans[-1].backend == b and b in ("dali", "gpu_resident")
                and stored_of(stretches_[spans[-1].first].res) == stored_of(st.res)):
            s = spans[-1]
            spans[-1] = Span(s.first, k, b, s.start_step, s.steps + st.steps)
        else:
            spans.append(Span(k, k, b, step, st.steps))
        step += st.steps
    return spans


def _check(stages: Sequence[Stage]) -> list[Stage]:
    if not stages:
        raise DataError("a curriculum needs at least one stage")
    out = [s if isinstance(s, Stage) else Stage(*s) for s in stages]
    for s in out:
        if s.steps <= 0:
            raise DataError(f"bad stage {s}: steps must be positive")
    return out


class _Build(threading.Thread):
    """Background: close the previous loader (or wait for a stale build and close what it built), then
    build + pre-fill the loader of `spec` (a span's backend, stretches and seeds, fixed at creation so a
    re-plan on the consumer's thread never changes what this thread builds)."""

    def __init__(self, owner: "CurriculumLoader", span_idx: int, spec: tuple, start_batch: int, previous):
        super().__init__(name=f"fastvit-curriculum-build-{span_idx}", daemon=True)
        self.owner, self.span_idx, self.spec, self.start_batch, self.previous = owner, span_idx, spec, start_batch, previous
        self.loader = self.first = self.error = None
        self.build_s = 0.0
        self.stale = False
        self.done = threading.Event()

    def run(self):
        try:
            if self.previous is not None:
                _dispose(self.previous)
                self.previous = None
            t0 = time.perf_counter()
            dev = self.owner.device
            with _side_stream(dev):   # a shard decode overlaps the training kernels, not queued behind them
                self.loader = self.owner._build(self.spec, self.start_batch)
                self.first = self.loader.next_batch()  # compile + decode the first batch now, not at the switch
                if dev.type == "cuda":
                    _used_by_consumer(dev, self.first, getattr(self.loader, "shard", None))
                    torch.cuda.current_stream(dev).synchronize()  # the consumer uses another thread
            self.build_s = time.perf_counter() - t0
        except BaseException as e:  # handed to the consumer at the switch
            self.error = e
        finally:
            if not self.stale:
                self.owner._on_ready(self.span_idx)
            self.done.set()


def _side_stream(device: torch.device):
    """On cuda: a stream of the builder's own, so a GPU decode (nvJPEG, the resident shard's copies) runs
    beside the training kernels on the default stream instead of between them."""
    import contextlib

    return torch.cuda.stream(torch.cuda.Stream(device)) if device.type == "cuda" else contextlib.nullcontext()


def _used_by_consumer(device: torch.device, *objs) -> None:
    """Tensors made on the builder's stream that the consumer reads on the default stream: the caching
    allocator must not hand their memory to the builder's stream again before the default stream's work
    queued at their release is done (record_stream)."""
    consumer = torch.cuda.default_stream(device)
    for o in objs:
        items = o if isinstance(o, (tuple, list)) else vars(o).values() if hasattr(o, "__dataclass_fields__") else [o]
        for t in items:
            if isinstance(t, torch.Tensor) and t.is_cuda:
                t.record_stream(consumer)


def _dispose(x) -> None:
    """Close a loader, or wait for a (stale) build and close what it built."""
    if isinstance(x, _Build):
        x.join()
        if x.loader is not None:
            x.loader.close()
    elif x is not None:
        x.close()


class CurriculumLoader:
    """Yields (images uint8 (B,3,r,r), labels int64 (B,), stage) for every planned step, in order."""

    def __init__(self, ds: PreppedDataset | DataSource, stages: Sequence[Stage], backend: str = AUTO,
                 device="cuda", seed: int = 0, *, split: str = "train", workers: int | None = None,
                 start_step: int = 0, merge: bool = True, resident_fallback: str | None = None, **options):
        """`ds`: a PreppedDataset with `backend` and `device` (resolved here, for every stored resolution
        of `split`: fastvit.data.source), or a DataSource resolved before (used as it is)."""
        stages = _check(stages)
        self.opts = LoaderOptions.from_kwargs(options)
        source = source_of(ds, backend, device, [(split, None)], src=self.opts.src)
        self.source, self.ds, self.device, self.backend = source, source.ds, source.device, source.backend
        self.split, self.seed, self.workers = split, int(seed), workers
        if self.opts.res_schedule is not None:
            raise DataError("CurriculumLoader plans sizes from its stages; res_schedule is not an option here")

        fmt = source.container(split)                  # None: the source tree (torchvision)
        stored_of = (lambda r: r) if fmt is None else (lambda r: self.ds.stored_res(r, split, fmt))
        backend_of = None
        if self.backend == "gpu_resident":  # stretches whose shard does not fit run on a streaming backend
            if resident_fallback is None:   # the best streaming backend installed that reads the split
                self._stream, self._no_stream = source.streaming_source(split)  # fine while every shard fits
            else:
                self._stream, self._no_stream = DataSource.resolve(self.ds, resident_fallback, self.device), ""
            backend_of = self._resident_or(self._stream and self._stream.backend, stored_of)
        self._span = lambda st: plan_spans(st, self.backend, stored_of, merge=merge, backend_of=backend_of)
        self._set_plan(stages)
        if not 0 <= start_step < self.total_steps:
            raise DataError(f"start_step {start_step} is outside 0..{self.total_steps - 1}")

        # Records (per consumed step, from start_step on).
        self.start_step = int(start_step)
        self.data_wait_s: deque[float] = deque(maxlen=WAITS_KEPT)   # the last WAITS_KEPT steps' waits
        self.data_wait_total_s = 0.0
        self.last_wait_s = 0.0
        self.switch_steps: list[int] = []           # global steps at which a new span's first batch was served
        self.ready_step: dict[int, int] = {}        # span -> steps consumed when its pre-fill completed
        self.build_s: dict[int, float] = {}         # span -> seconds to build + pre-fill
        self.prefilled_in_time: dict[int, bool] = {}  # span -> its first batch was waiting at its first step
        self._step = self.start_step
        self._lock = threading.Lock()
        self._closed = False

        self._cur_span = self._span_at(start_step)
        self._current = self._retiring = None
        self._closers: list[threading.Thread] = []
        self._pending = self._start_build(self._cur_span, start_step - self.spans[self._cur_span].start_step, None)
        self.replans = 0
        self.rebuilt_on_replan = 0                  # re-plans that could not keep the running loader

    def _set_plan(self, stages: list[Stage]) -> None:
        self.stages = stages
        self._stage_starts = [a for a, _ in step_ranges(stages)]
        self.total_steps = sum(s.steps for s in stages)
        self.stretches = stretches(stages)
        self._stretch_starts = [a for a, _ in step_ranges(self.stretches)]
        self.spans = self._span(self.stretches)

    def _span_at(self, step: int) -> int:
        return next(i for i, s in enumerate(self.spans) if s.start_step <= step < s.start_step + s.steps)

    # -------------------------------------------------------------------------------------------- build
    def _resident_or(self, fallback: str, stored_of):
        """backend_of(k) for a gpu_resident plan: "gpu_resident" when stretch k's shard fits the memory
        cap together with the previous stretch's resident shard (both are alive while k fills in the
        background), else `fallback` (one log line per stored resolution)."""
        from .backend_resident import estimate_bytes, memory_cap, resident_bytes

        self._fallback = fallback
        cap = memory_cap(self.device, self.opts.gpu_mem_share) - resident_bytes(self.device)
        size: dict[int, int] = {}
        fits: dict[int, bool] = {}

        def est(r: int) -> int:
            if r not in size:
                size[r] = estimate_bytes(self.ds, self.split, r)
            return size[r]

        def backend_of(k: int) -> str:
            r = stored_of(self.stretches[k].res)  # self.stretches: the current plan (replan swaps it)
            prev = stored_of(self.stretches[k - 1].res) if k > 0 else r
            with_prev = est(prev) if prev != r and fits.get(prev) else 0
            ok = est(r) + with_prev <= cap
            if not ok and fallback is None:
                raise DataError(f"gpu_resident: {self.split} @{r} px ({est(r) / 2**30:.2f} GiB decoded) does not fit "
                                f"{100 * self.opts.gpu_mem_share:.0f}% of {self.device.type} memory, and {self._no_stream}")
            if r not in fits or fits[r] != ok:
                if not ok:
                    log.warning("gpu_resident: %s @%d px (%.2f GiB decoded%s) does not fit %.0f%% of %s memory; "
                                "streaming it with %s", self.split, r, est(r) / 2**30,
                                f", with @{prev} px still held" if with_prev else "",
                                100 * self.opts.gpu_mem_share, self.device.type, fallback)
                fits[r] = ok
            return "gpu_resident" if ok else fallback

        return backend_of

    def _spec(self, span: Span) -> tuple:
        """(backend, stretches, seeds) of a span's loader. Its last stretch is endless in the loader's
        own plan: the CurriculumLoader decides where a span ends, so a re-plan that only changes that
        stretch's step count leaves the loader as it is."""
        ks = range(span.first, span.last + 1)
        st = [self.stretches[k] for k in ks]
        st[-1] = Stage(st[-1].res, st[-1].batch_size)   # endless: its step count is not the loader's business
        return (span.backend, tuple(st), tuple(stage_seed(self.seed, k) for k in ks))

    def _start_build(self, span_idx: int, start_batch: int, previous) -> _Build:
        b = _Build(self, span_idx, self._spec(self.spans[span_idx]), start_batch, previous)
        b.start()
        return b

    def _build(self, spec: tuple, start_batch: int):
        backend, stretches_, seeds = spec
        build = lambda src: build_loader(src, self.split, list(stretches_), list(seeds),  # noqa: E731
                                         train=True, seed=seeds[0], workers=self.workers,
                                         drop_last=True, start_batch=start_batch, opts=self.opts)
        if backend != "gpu_resident":
            return build(self.source if backend == self.backend else self._stream)
        from .backend_resident import ResidentTooLarge

        try:
            return build(self.source)
        except ResidentTooLarge as e:  # memory taken since the plan (activations, another shard): stream it
            fallback = self._fallback
            if fallback is None or (len(stretches_) > 1 and fallback != "dali"):  # only DALI resizes in a loader
                raise
            log.warning("gpu_resident: %s; streaming it with %s", e, fallback)
            return build(self._stream)

    def _on_ready(self, span_idx: int) -> None:
        with self._lock:
            self.ready_step[span_idx] = self._step

    # -------------------------------------------------------------------------------------------- iterate
    def __len__(self) -> int:
        return self.total_steps - self.start_step

    def stage_at(self, step: int) -> Stage:
        """The plan's stage of global step `step`."""
        return self.stages[max(0, bisect.bisect_right(self._stage_starts, step) - 1)]

    def __iter__(self):
        return self

    def next_ready(self) -> bool:
        """True when no build is pending or the pending one has its first batch in hand."""
        b = self._pending
        return b is None or b.done.is_set()

    @property
    def step(self) -> int:
        """Global step of the next batch."""
        return self._step

    def _take_pending(self):
        b = self._pending
        self.prefilled_in_time[b.span_idx] = b.done.is_set()
        b.done.wait()
        b.join()
        self._pending = None
        if b.error is not None:
            sp = self.spans[b.span_idx]
            raise DataError(f"building the loader for stretches {sp.first}..{sp.last} failed: {b.error}") from b.error
        self.build_s[b.span_idx] = b.build_s
        return b.loader, b.first

    def __next__(self):
        if self._closed or self._step >= self.total_steps:
            self.close()
            raise StopIteration
        t0 = time.perf_counter()
        span = self.spans[self._cur_span]
        if self._current is None:  # first step of a span: take the pre-filled loader
            self._current, batch = self._take_pending()
            self.switch_steps.append(self._step)
            old, self._retiring = self._retiring, None
            if self._cur_span + 1 < len(self.spans):
                # The next build starts now, on a thread that first closes the finished span's
                # loader: at most two spans are ever alive, and the consumer waits for neither.
                self._pending = self._start_build(self._cur_span + 1, 0, old)
            elif old is not None:
                t = threading.Thread(target=old.close, name="fastvit-curriculum-close", daemon=True)
                t.start()
                self._closers.append(t)
        else:
            batch = self._current.next_batch()
        wait = time.perf_counter() - t0
        images, labels = batch
        stage = self.stage_at(self._step)
        with self._lock:
            self.data_wait_s.append(wait)
            self.data_wait_total_s += wait
            self.last_wait_s = wait
            self._step += 1
        if self._step == span.start_step + span.steps and self._cur_span + 1 < len(self.spans):
            # Span done. Its loader stays open until the next step starts (the caller may still
            # be using this batch), then the next builder closes it.
            self._retiring, self._current = self._current, None
            self._cur_span += 1
        return images, labels, stage

    # -------------------------------------------------------------------------------------------- re-plan
    def replan(self, stages: Sequence[Stage]) -> bool:
        """Replace the plan from the next step on, in place (call it between batches, from the consumer).

        `stages` is the whole new plan: the batch order already served must be unchanged (the
        stretches done are the same, the one in progress keeps its res and batch size; its step count
        may change, down to the steps it has already served); later stages may change in any way.
        Afterwards this loader yields exactly what `CurriculumLoader(ds, stages, start_step=self.step)`
        would (same order, same switch steps, the new Stage objects), so a run resumed from a
        checkpoint with the same plan history sees the same batches.

        The running loader is kept whenever it can serve the new plan (always when the current span is
        one stretch: its loader plan is endless); a changed next span is rebuilt in the background
        (the stale build is discarded). Returns True when the running loader was kept.
        """
        if self._closed:
            raise DataError("the curriculum loader is closed")
        new = _check(stages)
        g = self._step
        new_total = sum(s.steps for s in new)
        if g >= new_total:
            raise DataError(f"the new plan has {new_total} steps, but {g} were already served")
        old_st, new_st = self.stretches, stretches(new)
        if g > 0:  # the order history must stay as it was served
            kd = max(0, bisect.bisect_right(self._stretch_starts, g - 1) - 1)
            old = old_st[kd]
            if (len(new_st) <= kd or new_st[:kd] != old_st[:kd] or new_st[kd].loader_key != old.loader_key
                    or new_st[kd].steps < g - self._stretch_starts[kd]):
                raise DataError(f"a re-plan at step {g} may change only steps not yet served "
                                f"(stretch {kd}: res {old.res}, batch {old.batch_size} was in progress)")
        old_span = self.spans[self._cur_span] if self._current is not None else None
        self._set_plan(new)   # before the spans are read: the resident backend's choice reads self.stretches
        ns = self._span_at(g)
        nspan, rel = self.spans[ns], g - self.spans[ns].start_step
        kept = False
        cur = self._current
        if cur is not None:
            kept = (nspan.first, nspan.start_step, nspan.backend) == (old_span.first, old_span.start_step,
                                                                      old_span.backend) \
                and self._retarget(cur, self._spec(nspan), rel)
            if not kept:  # the consumer may still hold its last batch: closed at the next switch
                self._retiring, self._current = cur, None
                self.rebuilt_on_replan += 1
        self._cur_span = ns
        want = (ns + 1, 0) if kept else (ns, rel)
        b = self._pending
        if want[0] >= len(self.spans):
            self._pending = None
            if b is not None:
                self._discard(b)
        elif b is not None and b.spec == self._spec(self.spans[want[0]]) and b.start_batch == want[1]:
            b.span_idx = want[0]  # same loader under the new numbering
        else:
            if b is not None:
                b.stale = True
            self._pending = self._start_build(want[0], want[1], b)
        self.replans += 1
        return kept

    def _retarget(self, loader, spec: tuple, rel: int) -> bool:
        """Give a running loader the new stretches of its span when every batch it may already have
        scheduled (DALI's prefetch queue) is the same under both plans. The loader's BatchPlan is
        updated in place (BatchPlan.replace_stages): the backend's closures (DALI's source, FFCV's
        order) hold that object."""
        old = loader.plan
        if loader.next_index != rel:
            return False
        _, new_stretches, seeds = spec
        newp = BatchPlan(old.n, list(new_stretches), list(seeds), endless=old.endless, drop_last=old.drop_last,
                         shuffle=old.shuffle, res_fn=old.res_fn, rank=old.rank, world=old.world)
        if newp.max_batch_size > old.max_batch_size:  # DALI's pipeline was sized for the old batches
            return False
        for r in range(rel, rel + max(1, self.opts.batches_ahead) + 2):
            a, b = old.batch(r), newp.batch(r)
            if ((a.res, a.epoch, a.index_in_epoch, old.seeds[a.stage])
                    != (b.res, b.epoch, b.index_in_epoch, newp.seeds[b.stage])
                    or not np.array_equal(a.indices, b.indices)):
                return False
        old.replace_stages(newp.stages, newp.seeds)
        return True

    def _discard(self, b: _Build) -> None:
        b.stale = True
        t = threading.Thread(target=_dispose, args=(b,), name="fastvit-curriculum-close", daemon=True)
        t.start()
        self._closers.append(t)

    # -------------------------------------------------------------------------------------------- close
    def close(self) -> None:
        """Stop everything this loader started: builder thread, loaders, their threads and processes."""
        if self._closed:
            return
        self._closed = True
        b = self._pending
        if b is not None:
            b.join()  # cannot interrupt a compile; wait for it, then close what it built
            if b.loader is not None:
                b.loader.close()
            self._pending = None
        for loader in (self._current, self._retiring):
            if loader is not None:
                loader.close()
        self._current = self._retiring = None
        for t in self._closers:
            t.join()
        self._closers = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
