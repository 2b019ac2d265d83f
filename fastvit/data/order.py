"""Which samples go in which batch: a pure function of (seed, stage, epoch, batch).

Every backend draws its order from here, so the same seed gives the same order on FFCV, DALI,
torchvision and the GPU-resident path, and a run resumed at global step g sees exactly the batches an
uninterrupted run would have (the order of batch g is computed, never replayed).

    plan = BatchPlan(n=9469, stages=[Stage(res=64, batch_size=512, steps=1000), ...], seeds=[s0, ...])
    spec = plan.batch(g)     # BatchSpec(stage, res, epoch, index_in_epoch, indices (bs,) int64)

Stages are fastvit.stage.Stage (only res, batch_size and steps matter here); `endless=True` makes the
last stage run forever (make_loader's epoch-per-pass loaders, and the curriculum loader's span
loaders, whose end the CurriculumLoader decides).

A stage starts a fresh epoch (its own seed, epoch 0); epochs wrap inside a stage. With drop_last the
samples past the last full batch of an epoch are skipped; without it the last batch is smaller.

Distributed data parallel (`rank`, `world`): a stage's batch_size is the *global* batch B, a multiple
of w. Rank r of w reads every w-th sample of each epoch's order, `order[r::w]`, B/w at a time: with
drop_last its batch b is exactly every w-th sample of global batch b (B/w of them), so the ranks'
shards of an epoch are disjoint and together cover it, w ranks train on the very batches one process
would, and a run can resume on another number of ranks. Without drop_last (evaluation: every image
once) the ranks' counts of batches may differ by one; no rank gets an empty batch.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

from fastvit.stage import Stage


RANK_SEED_STRIDE = 7919   # augmentation seeds: seed + stride × rank (rank 0: the one-process seed)


def stage_seed(seed: int, stage: int) -> int:
    """A 31-bit seed for stage `stage` of a run seeded `seed` (independent streams per stage)."""
    return int(np.random.SeedSequence([int(seed), int(stage), 0x5EED]).generate_state(1)[0] & 0x7FFFFFFF)


@lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    p = np.random.default_rng([int(seed), int(epoch)]).permutation(n).astype(np.int64)
    p.setflags(write=False)
    return p


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool | str = True) -> np.ndarray:
    """(n,) int64 sample indices of one epoch (read-only, cached: a backend asks once per batch).

    shuffle: True, a new permutation per epoch (training); "fixed", one permutation for every epoch
    (evaluation: every image once per pass, and a capped evaluation's prefix is a uniform sample of
    the split that stays the same from one evaluation to the next, not the first classes of a
    class-ordered shard); False, stored order."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return _permutation(n, seed, 0 if shuffle == "fixed" else epoch)


@dataclass(frozen=True)
class BatchSpec:
    stage: int           # index into plan.stages
    res: int             # output side length of this batch
    epoch: int           # epoch within the stage
    index_in_epoch: int  # batch index within the epoch
    indices: np.ndarray  # (bs,) int64 sample indices, bs <= batch_size


class BatchPlan:
    """Global batch index -> BatchSpec for a run of stages over a dataset of n samples."""

    def __init__(self, n: int, stages: Sequence[Stage], seeds: Sequence[int], *, endless: bool = False,
                 drop_last: bool = True, shuffle: bool | str = True, res_fn: Callable[[int], int] | None = None,
                 rank: int = 0, world: int = 1):
        if n <= 0:
            raise ValueError("the dataset is empty")
        if not stages:
            raise ValueError("a plan needs at least one stage")
        if len(seeds) != len(stages):
            raise ValueError(f"{len(stages)} stages but {len(seeds)} seeds")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside 0..{world - 1}")
        self.n, self.drop_last, self.shuffle, self.res_fn = n, drop_last, shuffle, res_fn
        self.rank, self.world = int(rank), int(world)
        self._set(stages, seeds, endless)

    def _set(self, stages: Sequence[Stage], seeds: Sequence[int], endless: bool) -> None:
        for s in stages[:-1] if endless else stages:
            if s.steps <= 0:
                raise ValueError(f"stage {s} has no steps (only the last stage of an endless plan may)")
        for s in stages:
            if s.batch_size % self.world:
                raise ValueError(f"batch size {s.batch_size} does not split into {self.world} equal rank batches")
            if self.batches_per_epoch_of(s) == 0:
                raise ValueError(f"batch size {s.batch_size} is larger than the dataset ({self.n} samples) with drop_last")
        self.stages, self.seeds, self.endless = tuple(stages), tuple(int(x) for x in seeds), endless
        self.starts = [0]  # global index of each stage's first batch
        for s in self.stages[:-1]:
            self.starts.append(self.starts[-1] + s.steps)

    def replace_stages(self, stages: Sequence[Stage], seeds: Sequence[int]) -> None:
        """Swap in a re-planned list of stages, in place: a running backend's order source holds this
        object, so the batches it schedules from now on follow the new plan. The caller (the
        CurriculumLoader) checks first that no batch already scheduled changes."""
        self._set(stages, seeds, self.endless)

    def batches_per_epoch_of(self, s: Stage) -> int:
        """This rank's batches per epoch of stage `s` (with drop_last the same on every rank)."""
        if self.drop_last:
            return self.n // s.batch_size
        return -(-len(range(self.rank, self.n, self.world)) // self.local_batch_size(s))

    def local_batch_size(self, s: Stage) -> int:
        """This rank's rows of a full batch of stage `s` (B / world)."""
        return s.batch_size // self.world

    def rank_epoch_order(self, stage: int, epoch: int) -> np.ndarray:
        """This rank's samples of one epoch in the order it reads them, for a backend that batches a
        flat order itself (FFCV, at local_batch_size)."""
        order = epoch_order(self.n, self.seeds[stage], epoch, self.shuffle)
        return order if self.world == 1 else order[self.rank::self.world]

    def batches_per_epoch(self, stage: int = 0) -> int:
        return self.batches_per_epoch_of(self.stages[stage])

    @property
    def total_steps(self) -> int | None:
        return None if self.endless else self.starts[-1] + self.stages[-1].steps

    @property
    def max_batch_size(self) -> int:
        """The largest batch this rank reads (a global batch / world)."""
        return max(self.local_batch_size(s) for s in self.stages)

    def locate(self, g: int) -> tuple[int, int]:
        """(stage, step within the stage) of global batch g."""
        total = self.total_steps
        if g < 0 or (total is not None and g >= total):
            raise IndexError(f"batch {g} is outside the plan (0..{total})")
        k = bisect.bisect_right(self.starts, g) - 1
        return k, g - self.starts[k]

    def epoch_end(self, g: int) -> int:
        """Global index one past the last batch of the epoch that contains batch g (capped at the stage end)."""
        k, s = self.locate(g)
        nb = self.batches_per_epoch(k)
        end = self.starts[k] + (s // nb + 1) * nb
        if self.endless and k == len(self.stages) - 1:
            return end
        return min(end, self.starts[k] + self.stages[k].steps)

    def batch(self, g: int) -> BatchSpec:
        k, s = self.locate(g)
        st = self.stages[k]
        nb = self.batches_per_epoch_of(st)
        epoch, b = divmod(s, nb)
        order = epoch_order(self.n, self.seeds[k], epoch, self.shuffle)
        if self.world > 1:                   # this rank's share: every world-th sample of the epoch
            order, lb = order[self.rank::self.world], self.local_batch_size(st)
            idx = order[b * lb: (b + 1) * lb]
        else:
            idx = order[b * st.batch_size: min((b + 1) * st.batch_size, self.n)]
        res = st.res if self.res_fn is None else int(self.res_fn(g))
        return BatchSpec(stage=k, res=res, epoch=epoch, index_in_epoch=b, indices=idx)
