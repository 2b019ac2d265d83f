"""CurriculumLoader: exact switch steps, background build + pre-fill, resume order, clean shutdown (CPU).

FFCV runs uncompiled here (ffcv_jit=False: the same pipeline in plain Python); the compiled path is
covered by tests/test_data.py, and the background compile by the same code that builds any loader.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from fastvit.data import CurriculumLoader, DataError, Stage, open_dataset, plan_spans
from fastvit.data.order import BatchPlan, stage_seed

N_TRAIN = 64
# 32 px reads the 32 shard; 48 and 64 both read the 64 shard (one DALI / GPU-resident segment).
# Stage 2 (72 steps at 6 per batch: 10 batches per epoch) wraps epochs inside the stage.
STAGES = [Stage(res=32, batch_size=8, steps=5), Stage(res=48, batch_size=8, steps=4), Stage(res=64, batch_size=6, steps=12)]
BOUNDS = [0, 5, 9, 21]


@pytest.fixture(scope="module")
def ds(tiny_prepped):
    return open_dataset(tiny_prepped)


@pytest.fixture(scope="module")
def train_labels(tiny_src):
    from torchvision.datasets import ImageFolder

    return np.asarray(ImageFolder(str(tiny_src / "train")).targets)


def expected_indices(step: int) -> np.ndarray:
    """What stage k's own plan says for `step` (independent of how stages are grouped into loaders)."""
    k = max(i for i in range(len(STAGES)) if BOUNDS[i] <= step)
    st = STAGES[k]
    plan = BatchPlan(N_TRAIN, [st], [stage_seed(0, k)])
    return plan.batch(step - BOUNDS[k]).indices


def _leak_check():
    try:                                   # optional: without it only the threads are checked
        import psutil
    except ImportError:
        psutil = None
    threads = set(threading.enumerate())
    children = psutil.Process().children(recursive=True) if psutil else None

    def check():
        left = {t for t in threading.enumerate() if t.is_alive()} - threads
        assert not left, f"threads left: {left}"
        assert psutil is None or psutil.Process().children(recursive=True) == children

    return check


def test_plan_spans_groups_stages_on_one_shard():
    stored = {32: 32, 48: 64, 64: 64}.get
    dali = plan_spans(STAGES, "dali", stored)
    assert [(s.first, s.last, s.start_step, s.steps) for s in dali] == [(0, 0, 0, 5), (1, 2, 5, 16)]
    ffcv = plan_spans(STAGES, "ffcv", stored)
    assert [(s.first, s.last) for s in ffcv] == [(0, 0), (1, 1), (2, 2)]
    assert len(plan_spans(STAGES, "dali", stored, merge=False)) == 3


@pytest.mark.parametrize("backend", ["dali", "gpu_resident", "ffcv"])
def test_switches_at_exact_steps_with_next_stage_prefilled(ds, backend, train_labels):
    check = _leak_check()
    kw = {"ffcv_jit": False} if backend == "ffcv" else {}
    cl = CurriculumLoader(ds, STAGES, backend=backend, device="cpu", seed=0, workers=2, **kw)
    assert len(cl) == 21
    steps = []
    for step, (images, labels, stage) in enumerate(cl):
        k = max(i for i in range(3) if BOUNDS[i] <= step)
        assert stage is STAGES[k]
        assert images.shape == (stage.batch_size, 3, stage.res, stage.res) and images.dtype == torch.uint8
        assert labels.dtype == torch.int64 and labels.tolist() == train_labels[expected_indices(step)].tolist()
        steps.append(step)
        if step + 1 in BOUNDS[1:-1]:
            # Before handing out the last batch of a segment, the next one must get ready in the
            # background, while this consumer still holds the current stage (no pull needed).
            deadline = time.monotonic() + 120
            while not cl.next_ready() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert cl.next_ready()
    assert steps == list(range(21))
    seg_starts = [s.start_step for s in cl.spans]
    assert cl.switch_steps == seg_starts
    for i, s in enumerate(cl.spans[1:], start=1):
        assert cl.ready_step[i] <= s.start_step and cl.prefilled_in_time[i]  # ready before its first step
    assert len(cl.data_wait_s) == 21 and all(w >= 0 for w in cl.data_wait_s)
    cl.close()
    check()


def test_resume_gives_the_uninterrupted_order(ds):
    full = CurriculumLoader(ds, STAGES, backend="gpu_resident", device="cpu", seed=0, workers=1)
    ref = [(x, y) for x, y, _ in full]
    for start in (3, 9, 16):  # mid-stage, a stage boundary inside a segment, mid-epoch of stage 2
        with CurriculumLoader(ds, STAGES, backend="gpu_resident", device="cpu", seed=0, workers=1,
                              start_step=start) as cl:
            got = [(x, y) for x, y, _ in cl]
        assert len(got) == 21 - start
        for (xa, ya), (xb, yb) in zip(ref[start:], got):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
    dali = CurriculumLoader(ds, STAGES, backend="dali", device="cpu", seed=0, workers=1, start_step=7)
    assert [y.tolist() for _, y, _ in dali] == [y.tolist() for _, y in ref[7:]]  # same order on DALI


def test_unmerged_segments_give_the_same_batches(ds):
    a = [y.tolist() for _, y, _ in CurriculumLoader(ds, STAGES, backend="dali", device="cpu", seed=0, workers=1)]
    b = [y.tolist() for _, y, _ in CurriculumLoader(ds, STAGES, backend="dali", device="cpu", seed=0, workers=1,
                                                    merge=False)]
    assert a == b


def test_torchvision_curriculum_and_close_mid_run(ds):
    check = _leak_check()
    cl = CurriculumLoader(ds, STAGES[:2], backend="torchvision", device="cpu", seed=0, workers=2)
    got = []
    for images, labels, stage in cl:
        got.append((images.shape[-1], stage.res))
        if len(got) == 6:  # inside stage 1, a build may be pending or done: close must stop everything
            break
    assert got == [(32, 32)] * 5 + [(48, 48)]
    cl.close()
    check()


def test_close_while_next_stage_builds(ds):
    check = _leak_check()
    cl = CurriculumLoader(ds, STAGES, backend="ffcv", device="cpu", seed=0, workers=2, ffcv_jit=False)
    next(cl)
    cl.close()  # the stage-1 build is likely still running: close waits for it and shuts it down
    check()
    with pytest.raises(StopIteration):
        next(cl)


def test_stage_validation(ds):
    with pytest.raises(DataError, match="at least one stage"):
        CurriculumLoader(ds, [], backend="dali", device="cpu")
    with pytest.raises(DataError, match="must be positive"):
        CurriculumLoader(ds, [Stage(32, 8, 0)], backend="dali", device="cpu")
    with pytest.raises(DataError, match="start_step"):
        CurriculumLoader(ds, [Stage(32, 8, 3)], backend="dali", device="cpu", start_step=3)


# ------------------------------------------------------------------------------------------------ re-plan

# At step 2 (stage 0): stage 0 grows 5 -> 7, stage 2 shrinks. At step 9 (stage 1, which DALI and the
# GPU-resident path serve in one loader with stage 2): stage 2 shrinks again and a 32 px stage follows.
REPLANS = {2: [Stage(32, 8, 7), Stage(48, 8, 4), Stage(64, 6, 10)],
           9: [Stage(32, 8, 7), Stage(48, 8, 4), Stage(64, 6, 6), Stage(32, 8, 3)]}
FINAL = REPLANS[9]


def _labels_of(stages, step):
    starts = np.cumsum([0] + [s.steps for s in stages])
    k = max(i for i in range(len(stages)) if starts[i] <= step)
    st = stages[k]
    plan = BatchPlan(N_TRAIN, [st], [stage_seed(0, k)], endless=True)
    return plan.batch(step - starts[k]).indices


@pytest.mark.parametrize("backend", ["dali", "gpu_resident", "ffcv"])
def test_replan_in_place_keeps_the_loader_and_switches_at_the_new_steps(ds, backend, train_labels):
    check = _leak_check()
    kw = {"ffcv_jit": False} if backend == "ffcv" else {}
    cl = CurriculumLoader(ds, STAGES, backend=backend, device="cpu", seed=0, workers=2, **kw)
    built = []
    build = cl._build
    cl._build = lambda spec, start: (built.append((spec[1][0].res, start)), build(spec, start))[1]
    got = []
    for step in range(20):
        if step in REPLANS:
            running = cl._current
            assert cl.replan(REPLANS[step]) is True              # the running loader serves the new plan
            assert cl._current is running and cl.step == step
        images, labels, stage = next(cl)
        got.append((images.clone(), labels.clone()))  # FFCV on CPU reuses its batch buffers
        plan = FINAL if step >= 9 else REPLANS[2] if step >= 2 else STAGES
        assert labels.tolist() == train_labels[_labels_of(plan, step)].tolist(), step
        assert images.shape == (stage.batch_size, 3, stage.res, stage.res)
    with pytest.raises(StopIteration):
        next(cl)
    starts = [0, 7, 17] if backend != "ffcv" else [0, 7, 11, 17]   # FFCV: one loader per stage
    assert cl.switch_steps == starts == [s.start_step for s in cl.spans]
    # one build per later segment (the first was built before the wrapper), none for the re-plans
    assert sorted(built) == sorted([(32, 0), (48, 0)] + ([(64, 0)] if backend == "ffcv" else []))
    assert cl.rebuilt_on_replan == 0 and cl.replans == 2
    cl.close()
    check()
    # a run resumed after the last re-plan (the checkpoint holds the final plan) sees the same batches
    with CurriculumLoader(ds, FINAL, backend=backend, device="cpu", seed=0, workers=1, start_step=12, **kw) as cl2:
        resumed = [(x.clone(), y.clone()) for x, y, _ in cl2]
    assert [y.tolist() for _, y in resumed] == [y.tolist() for _, y in got[12:]]
    if backend == "gpu_resident":  # crops are a function of the plan too
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(resumed, got[12:]))


def test_replan_inside_the_prefetch_window_rebuilds_and_stays_exact(ds, train_labels):
    check = _leak_check()
    cl = CurriculumLoader(ds, STAGES, backend="dali", device="cpu", seed=0, workers=1)
    for _ in range(6):
        next(cl)                                            # step 5 = first step of the 48/64 segment
    new = [Stage(32, 8, 5), Stage(48, 8, 2), Stage(64, 6, 12)]   # stage 1 ends at 7: DALI scheduled past it
    assert cl.replan(new) is False and cl.rebuilt_on_replan == 1
    rest = [y.tolist() for _, y, _ in cl]
    assert rest == [train_labels[_labels_of(new, g)].tolist() for g in range(6, 19)]
    with pytest.raises(DataError, match="only steps not yet served"):
        cl2 = CurriculumLoader(ds, STAGES, backend="dali", device="cpu", seed=0, workers=1)
        next(cl2), next(cl2)
        try:
            cl2.replan([Stage(32, 8, 1)] + STAGES[1:])
        finally:
            cl2.close()
    cl.close()
    check()


def test_yields_the_plans_own_stages_and_keeps_one_order_across_keep_changes(ds, monkeypatch, train_labels):
    """The loader is the single source of "what this step is": it yields the plan's Stage objects
    (keep rate included); stages that differ only in what the model does share one batch order."""
    import fastvit.data.curriculum as C

    monkeypatch.setattr(C, "WAITS_KEPT", 4)
    plan = [Stage(32, 8, 3, keep=0.5), Stage(32, 8, 4, keep=0.75), Stage(64, 6, 2)]
    with CurriculumLoader(ds, plan, backend="dali", device="cpu", seed=0, workers=1) as cl:
        got = [(y.tolist(), st) for _, y, st in cl]
        waits = list(cl.data_wait_s)
        assert cl.data_wait_total_s >= sum(waits) > 0 and cl.last_wait_s == waits[-1]
    assert [st for _, st in got] == [plan[0]] * 3 + [plan[1]] * 4 + [plan[2]] * 2
    assert all(a is b for (_, a), b in zip(got, [plan[0]] * 3 + [plan[1]] * 4 + [plan[2]] * 2))
    one = BatchPlan(N_TRAIN, [Stage(32, 8, 7)], [stage_seed(0, 0)])          # the merged stretch
    assert [y for y, _ in got[:7]] == [train_labels[one.batch(g).indices].tolist() for g in range(7)]
    assert len(waits) == 4                                  # bounded: a 24 h run keeps no per-step list
