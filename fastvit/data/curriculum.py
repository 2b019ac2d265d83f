"""CurriculumLoader: the image-size curriculum as one stream of batches, with no stall at a switch.

    cl = CurriculumLoader(ds, [Stage(64, 512, 1000), Stage(128, 256, 500)], backend="dali", device="cuda", seed=0)
    with cl:
        for images, labels, stage in cl: ...     # every stage's steps once, then it stops
    cl.data_wait_s                               # per step: seconds the consumer waited for data

How the switch stays stall-free:
- Consecutive stages that read the same stored shard form one *segment* served by one loader; on
  DALI and the GPU-resident path the output size (and batch size) changes inside that loader at the
  planned batch, no rebuild at all (see backend_dali).
- For the next segment a background thread first closes the previous segment's loader, then builds
  the next one (FFCV numba compile, DALI pipeline build, shard decode) and pulls its first batch
  (pre-fill). At the boundary the consumer takes that batch: the wait is a hand-over, not a build.
  At most two segments are alive: the current one and the one being built.
- Boundaries may fall mid-epoch: a stage is a number of steps, its epochs wrap inside it.

Re-plans (`cl.replan(stages)`, the trainer's drift correction) change step counts in place: a
segment's last stage is endless in its loader's own plan (this class decides where a segment ends), so
the running loader carries on; only a segment whose stages changed is rebuilt, in the background.

Order: stage k draws its batches from BatchPlan with seed stage_seed(seed, k), epochs counted from the
stage start, whatever the segmentation; so `start_step=g` (resume) yields exactly the batches an
uninterrupted run yields from step g on, and skipping costs nothing (no batch before g is decoded).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fastvit.stage import Stage

from .base import LoaderOptions
from .dataset import DataError, PreppedDataset
from .loader import BACKENDS, build_loader
from .order import BatchPlan, PlanStage, stage_seed

log = logging.getLogger("fastvit.data")


@dataclass(frozen=True)
class Segment:
    """Consecutive stages [first, last] served by one loader."""
    first: int
    last: int
    backend: str
    start_step: int  # global step of the segment's first batch
    steps: int


def _starts(stages: Sequence[Stage]) -> list[int]:
    out, acc = [], 0
    for s in stages:
        out.append(acc)
        acc += s.steps
    return out


def plan_segments(stages: Sequence[Stage], backend: str, stored_of, *, merge: bool = True,
                  backend_of=None) -> list[Segment]:
    """Group consecutive stages that one loader can serve (pure: stored_of(res) -> stored res).

    Only loaders whose output size is set per batch (dali, gpu_resident) serve several stages;
    FFCV compiles one size per loader and torchvision builds one transform.
    """
    segs: list[Segment] = []
    step = 0
    for k, st in enumerate(stages):
        b = backend_of(k) if backend_of else backend
        if (merge and segs and segs[-1].backend == b and b in ("dali", "gpu_resident")
                and stored_of(stages[segs[-1].first].res) == stored_of(st.res)):
            s = segs[-1]
            segs[-1] = Segment(s.first, k, b, s.start_step, s.steps + st.steps)
        else:
            segs.append(Segment(k, k, b, step, st.steps))
        step += st.steps
    return segs


class _Build(threading.Thread):
    """Background: close the previous loader (or wait for a stale build and close what it built), then
    build + pre-fill the loader of `spec` (a segment's backend and PlanStages, fixed at creation so a
    re-plan on the consumer's thread never changes what this thread builds)."""

    def __init__(self, owner: "CurriculumLoader", seg_idx: int, spec: tuple, start_batch: int, previous):
        super().__init__(name=f"fastvit-curriculum-build-{seg_idx}", daemon=True)
        self.owner, self.seg_idx, self.spec, self.start_batch, self.previous = owner, seg_idx, spec, start_batch, previous
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
            self.loader = self.owner._build(self.spec, self.start_batch)
            self.first = self.loader.next_batch()  # compile + decode the first batch now, not at the switch
            if self.owner.device.type == "cuda":
                torch.cuda.current_stream(self.owner.device).synchronize()  # the consumer uses another thread
            self.build_s = time.perf_counter() - t0
        except BaseException as e:  # handed to the consumer at the switch
            self.error = e
        finally:
            if not self.stale:
                self.owner._on_ready(self.seg_idx)
            self.done.set()


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

    def __init__(self, ds: PreppedDataset, stages: Sequence[Stage], backend: str = "dali", device="cuda",
                 seed: int = 0, *, split: str = "train", workers: int | None = None, start_step: int = 0,
                 merge: bool = True, resident_fallback: str = "dali", **options):
        self.stages = [s if isinstance(s, Stage) else Stage(*s) for s in stages]
        if not self.stages:
            raise DataError("a curriculum needs at least one stage")
        for s in self.stages:
            if s.res <= 0 or s.batch_size <= 0 or s.steps <= 0:
                raise DataError(f"bad stage {s}: res, batch_size and steps must be positive")
        if backend not in BACKENDS:
            raise DataError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        self.ds, self.split, self.backend, self.seed, self.workers = ds, split, backend, int(seed), workers
        self.device = torch.device(device)
        self.opts = LoaderOptions.from_kwargs(options)
        if self.opts.res_schedule is not None:
            raise DataError("CurriculumLoader plans sizes from its stages; res_schedule is not an option here")
        self.total_steps = sum(s.steps for s in self.stages)
        if not 0 <= start_step < self.total_steps:
            raise DataError(f"start_step {start_step} is outside 0..{self.total_steps - 1}")
        self.stage_start = _starts(self.stages)

        fmt = {"ffcv": "ffcv", "dali": "dali"}.get(backend)
        if backend == "gpu_resident":
            fmt = "ffcv" if "ffcv" in ds.formats(split) else "dali"
        if backend == "torchvision":
            ds.source_dir(split, self.opts.src)  # fail here, with one line, rather than at the first batch
        stored_of = (lambda r: r) if backend == "torchvision" else (lambda r: ds.stored_res(r, split, fmt))
        backend_of = None
        if backend == "gpu_resident":  # stages whose shard does not fit run on the fallback backend
            backend_of = self._resident_or(resident_fallback, stored_of)
        self._segment = lambda stages: plan_segments(stages, backend, stored_of, merge=merge, backend_of=backend_of)
        self.segments = self._segment(self.stages)

        # Records (per consumed step, from start_step on).
        self.start_step = int(start_step)
        self.data_wait_s: list[float] = []
        self.switch_steps: list[int] = []           # global steps at which a new segment's first batch was served
        self.ready_step: dict[int, int] = {}        # segment -> steps consumed when its pre-fill completed
        self.build_s: dict[int, float] = {}         # segment -> seconds to build + pre-fill
        self.prefilled_in_time: dict[int, bool] = {}  # segment -> its first batch was waiting at its first step
        self._step = self.start_step
        self._lock = threading.Lock()
        self._closed = False

        self._seg = next(i for i, s in enumerate(self.segments) if s.start_step <= start_step < s.start_step + s.steps)
        self._current = self._retiring = None
        self._closers: list[threading.Thread] = []
        self._pending = self._start_build(self._seg, start_step - self.segments[self._seg].start_step, None)
        self.replans = 0
        self.rebuilt_on_replan = 0                  # re-plans that could not keep the running loader

    # -------------------------------------------------------------------------------------------- build
    def _resident_or(self, fallback: str, stored_of):
        from .backend_resident import estimate_bytes, memory_budget

        budget = memory_budget(self.device, self.opts.gpu_mem_share)
        fits = {}

        def backend_of(k: int) -> str:
            r = stored_of(self.stages[k].res)  # self.stages: the current plan (replan swaps it)
            if r not in fits:
                fits[r] = estimate_bytes(self.ds, self.split, r) <= budget
                if not fits[r]:
                    log.info("gpu_resident: %s @%d px does not fit %.0f%% of free memory; using %s",
                             self.split, r, 100 * self.opts.gpu_mem_share, fallback)
            return "gpu_resident" if fits[r] else fallback

        return backend_of

    def _spec(self, seg: Segment, stages=None) -> tuple:
        """(backend, PlanStages) of a segment's loader. The segment's last stage is endless in the
        loader's own plan: the CurriculumLoader decides where a segment ends, so a re-plan that only
        changes that stage's step count leaves the loader as it is."""
        stages = self.stages if stages is None else stages
        ps = tuple(PlanStage(res=stages[k].res, batch_size=stages[k].batch_size,
                             steps=stages[k].steps if k < seg.last else None, seed=stage_seed(self.seed, k))
                   for k in range(seg.first, seg.last + 1))
        return (seg.backend, ps)

    def _start_build(self, seg_idx: int, start_batch: int, previous) -> _Build:
        b = _Build(self, seg_idx, self._spec(self.segments[seg_idx]), start_batch, previous)
        b.start()
        return b

    def _build(self, spec: tuple, start_batch: int):
        backend, plan_stages = spec
        return build_loader(self.ds, self.split, list(plan_stages), backend=backend, device=self.device, train=True,
                            seed=plan_stages[0].seed, workers=self.workers, drop_last=True,
                            start_batch=start_batch, opts=self.opts)

    def _on_ready(self, seg_idx: int) -> None:
        with self._lock:
            self.ready_step[seg_idx] = self._step

    # -------------------------------------------------------------------------------------------- iterate
    def __len__(self) -> int:
        return self.total_steps - self.start_step

    def stage_at(self, step: int) -> int:
        for k in range(len(self.stages) - 1, -1, -1):
            if step >= self.stage_start[k]:
                return k
        return 0

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
        self.prefilled_in_time[b.seg_idx] = b.done.is_set()
        b.done.wait()
        b.join()
        self._pending = None
        if b.error is not None:
            raise DataError(f"building the loader for stages {self.segments[b.seg_idx].first}.."
                            f"{self.segments[b.seg_idx].last} failed: {b.error}") from b.error
        self.build_s[b.seg_idx] = b.build_s
        return b.loader, b.first

    def __next__(self):
        if self._closed or self._step >= self.total_steps:
            self.close()
            raise StopIteration
        t0 = time.perf_counter()
        seg = self.segments[self._seg]
        if self._current is None:  # first step of a segment: take the pre-filled loader
            self._current, batch = self._take_pending()
            self.switch_steps.append(self._step)
            old, self._retiring = self._retiring, None
            if self._seg + 1 < len(self.segments):
                # The next build starts now, on a thread that first closes the finished segment's
                # loader: at most two segments are ever alive, and the consumer waits for neither.
                self._pending = self._start_build(self._seg + 1, 0, old)
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
            self._step += 1
        if self._step == seg.start_step + seg.steps and self._seg + 1 < len(self.segments):
            # Segment done. Its loader stays open until the next step starts (the caller may still
            # be using this batch), then the next builder closes it.
            self._retiring, self._current = self._current, None
            self._seg += 1
        return images, labels, self.stages[stage]

    # -------------------------------------------------------------------------------------------- re-plan
    def replan(self, stages: Sequence[Stage]) -> bool:
        """Replace the plan from the next step on, in place (call it between batches, from the consumer).

        `stages` is the whole new list: the stages already done must be unchanged and the one in
        progress keeps its res and batch size (its step count may change, down to the steps it has
        already served); later stages may change in any way. Afterwards this loader yields exactly
        what `CurriculumLoader(ds, stages, start_step=self.step)` would (same order, same switch
        steps), so a run resumed from a checkpoint with the same plan history sees the same batches.

        The running loader is kept whenever it can serve the new plan (always when the current
        segment is one stage: its loader plan is endless); a changed next segment is rebuilt in the
        background (the stale build is discarded). Returns True when the running loader was kept.
        """
        if self._closed:
            raise DataError("the curriculum loader is closed")
        new = [s if isinstance(s, Stage) else Stage(*s) for s in stages]
        for s in new:
            if s.res <= 0 or s.batch_size <= 0 or s.steps <= 0:
                raise DataError(f"bad stage {s}: res, batch_size and steps must be positive")
        g = self._step
        new_total = sum(s.steps for s in new)
        if g >= new_total:
            raise DataError(f"the new plan has {new_total} steps, but {g} were already served")
        if g > 0:  # the history must stay as it was served
            kd = self.stage_at(g - 1)
            old = self.stages[kd]
            if (len(new) <= kd or list(new[:kd]) != list(self.stages[:kd])
                    or (new[kd].res, new[kd].batch_size) != (old.res, old.batch_size)
                    or new[kd].steps < g - self.stage_start[kd]):
                raise DataError(f"a re-plan at step {g} may change only steps not yet served "
                                f"(stage {kd}: {old} was in progress)")
        self.stages = new  # before _segment: the resident backend's choice reads self.stages
        self.stage_start = _starts(new)
        self.total_steps = new_total
        segs = self._segment(new)
        ns = next(i for i, s in enumerate(segs) if s.start_step <= g < s.start_step + s.steps)
        nseg, rel = segs[ns], g - segs[ns].start_step
        kept = False
        cur = self._current
        if cur is not None:
            oseg = self.segments[self._seg]
            kept = (nseg.first, nseg.start_step, nseg.backend) == (oseg.first, oseg.start_step, oseg.backend) \
                and self._retarget(cur, self._spec(nseg), rel)
            if not kept:  # the consumer may still hold its last batch: closed at the next switch
                self._retiring, self._current = cur, None
                self.rebuilt_on_replan += 1
        self.segments, self._seg = segs, ns
        want = (ns + 1, 0) if kept else (ns, rel)
        b = self._pending
        if want[0] >= len(segs):
            self._pending = None
            if b is not None:
                self._discard(b)
        elif b is not None and b.spec == self._spec(segs[want[0]]) and b.start_batch == want[1]:
            b.seg_idx = want[0]  # same loader under the new numbering
        else:
            if b is not None:
                b.stale = True
            self._pending = self._start_build(want[0], want[1], b)
        self.replans += 1
        return kept

    def _retarget(self, loader, spec: tuple, rel: int) -> bool:
        """Give a running loader the new plan of its segment when every batch it may already have
        scheduled (DALI's prefetch queue) is the same under both plans. The plan object is updated in
        place: the backend's closures (DALI's source, FFCV's order) hold that object."""
        old = loader.plan
        if loader.next_index != rel:
            return False
        newp = BatchPlan(old.n, list(spec[1]), drop_last=old.drop_last, shuffle=old.shuffle, res_fn=old.res_fn)
        if newp.max_batch_size > old.max_batch_size:  # DALI's pipeline was sized for the old batches
            return False
        for r in range(rel, rel + max(1, self.opts.batches_ahead) + 2):
            a, b = old.batch(r), newp.batch(r)
            if ((a.res, a.epoch, a.index_in_epoch, old.stages[a.stage].seed)
                    != (b.res, b.epoch, b.index_in_epoch, newp.stages[b.stage].seed)
                    or not np.array_equal(a.indices, b.indices)):
                return False
        old.__dict__.update(newp.__dict__)
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
