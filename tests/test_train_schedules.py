"""Schedules at their boundaries, the budget clock, the planner with a fake clock and fake speeds."""
from __future__ import annotations

import math

import pytest

from fastvit.train import schedules as S
from fastvit.train.budget import BudgetClock
from fastvit.train.config import ConfigError, TrainConfig, make_config
from fastvit.stage import Stage
from fastvit.train.planner import (BatchFallback, BudgetTooSmall, DriftMonitor, OutOfMemory, Plan, build_stages,
                                   drifted, fit_and_probe, plan_budget, remaining_planned_s, replan)


# ---------------------------------------------------------------- learning rate

@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_lr_warmup_then_exactly_zero_at_end(decay):
    kw = dict(base_lr=1e-3, warmup=0.1, decay=decay)
    assert S.lr_at(0.0, **kw) == 0.0
    assert S.lr_at(0.05, **kw) == pytest.approx(5e-4)
    assert S.lr_at(0.1, **kw) == pytest.approx(1e-3)           # peak at the end of warm-up
    assert S.lr_at(1.0, **kw) == 0.0                            # exactly 0 at the end of the budget
    assert S.lr_at(1.5, **kw) == 0.0
    assert 0 < S.lr_at(0.999, **kw) < 1e-5
    vals = [S.lr_at(p / 100, **kw) for p in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))          # monotone decay after warm-up
    mid = S.lr_at(0.55, **kw)
    assert mid == pytest.approx(5e-4)                           # half-way through the decay: both give half


def test_lr_rejects_unknown_decay():
    with pytest.raises(ValueError):
        S.lr_at(0.5, base_lr=1.0, decay="step")


def test_lr_scale_rules():
    assert S.lr_scale_for_batch(512, 256, "linear") == 2.0
    assert S.lr_scale_for_batch(512, 256, "sqrt") == pytest.approx(math.sqrt(2))
    assert S.lr_scale_for_batch(512, 256, "none") == 1.0


# ---------------------------------------------------------------- resolution curriculum

def test_curriculum_default_and_boundaries():
    cur = S.default_curriculum(224)
    assert cur == [(112, 0.4), (160, 0.75), (224, 1.0)]
    assert S.default_curriculum(64) == [(32, 0.4), (48, 0.75), (64, 1.0)]
    assert all(r % 16 == 0 for r, _ in cur)
    assert S.res_at(0.0, cur) == 112
    assert S.res_at(0.3999, cur) == 112
    assert S.res_at(0.4, cur) == 160                             # a stage starts at its boundary
    assert S.res_at(0.75, cur) == 224
    assert S.res_at(1.0, cur) == 224
    assert S.default_curriculum(32) == [(32, 1.0)]              # too small to climb: one stage
    assert S.default_curriculum(64, n=1) == [(64, 1.0)]


def test_parse_curriculum():
    assert S.parse_curriculum("64:1,128:2,224:1") == [(64, 0.25), (128, 0.75), (224, 1.0)]
    assert S.parse_curriculum("96,160") == [(96, 0.5), (160, 1.0)]
    for bad in ["", "64:1,128", "64:-1", "x:1"]:
        with pytest.raises(ValueError):
            S.parse_curriculum(bad)


# ---------------------------------------------------------------- keep rate

@pytest.mark.parametrize("kind", ["fixed", "linear", "cyclic", "cosine"])
def test_keep_all_patches_in_last_part(kind):
    kw = dict(kind=kind, keep_min=0.25, full_from=0.8, cycles=3)
    assert S.keep_at(0.8, **kw) == 1.0
    assert S.keep_at(0.99, **kw) == 1.0
    assert S.keep_at(1.0, **kw) == 1.0
    for p in [i / 50 for i in range(40)]:
        assert 0.25 - 1e-9 <= S.keep_at(p, **kw) <= 1.0


def test_keep_shapes():
    assert S.keep_at(0.0, kind="linear", keep_min=0.5, full_from=0.8) == 0.5
    assert S.keep_at(0.4, kind="linear", keep_min=0.5, full_from=0.8) == pytest.approx(0.75)
    assert S.keep_at(0.4, kind="cosine", keep_min=0.5, full_from=0.8) == pytest.approx(0.75)
    assert S.keep_at(0.1, kind="cosine", keep_min=0.5, full_from=0.8) < \
        S.keep_at(0.1, kind="linear", keep_min=0.5, full_from=0.8)
    assert S.keep_at(0.5, kind="fixed", keep_min=0.5, full_from=0.8) == 0.5
    # cyclic: 2 cycles over [0, 0.8): min at 0 / 0.4, max at 0.2 / 0.6
    kw = dict(kind="cyclic", keep_min=0.5, full_from=0.8, cycles=2)
    assert S.keep_at(0.0, **kw) == pytest.approx(0.5)
    assert S.keep_at(0.2, **kw) == pytest.approx(1.0)
    assert S.keep_at(0.4, **kw) == pytest.approx(0.5)
    assert S.keep_at(0.6, **kw) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        S.keep_at(0.1, kind="random")


def test_keep_quantize_and_count():
    assert S.quantize_keep(0.51) == 0.625
    assert S.quantize_keep(0.5) == 0.5
    assert S.quantize_keep(0.01) == 0.125
    assert S.quantize_keep(1.0) == 1.0
    assert S.keep_count(224, 0.5) == 98
    assert S.keep_count(32, 0.1) == 1
    assert S.keep_count(64, 1.0) == 16


def test_kept_tokens_rounded_one_way_in_planner_and_model():
    """49 patches at keep 0.5: the planner's token count (batch sizes, FLOPs) and the model's K agree
    (round half up, 25); Python's round() would give 24."""
    from fastvit.models import num_kept_patches

    assert S.keep_count(112, 0.5) == num_kept_patches(49, 0.5) == 25
    assert S.keep_count(16 * 5, 0.5) == num_kept_patches(25, 0.5) == 13
    assert S.batch_for(112, 0.5, base_batch=49, ref_res=112, const_tokens=True, max_batch=10_000,
                       multiple=1) == 49 * 49 // 25


def test_batch_const_tokens():
    kw = dict(base_batch=256, ref_res=224, max_batch=4096, const_tokens=True)
    assert S.batch_for(224, 1.0, **kw) == 256
    assert S.batch_for(112, 1.0, **kw) == 1024                 # 4× fewer tokens per image
    assert S.batch_for(224, 0.5, **kw) == 512
    assert S.batch_for(112, 1.0, **{**kw, "max_batch": 600}) == 600
    assert S.batch_for(112, 1.0, **{**kw, "const_tokens": False}) == 256
    assert S.batch_for(176, 1.0, **kw) % 8 == 0


def test_aug_ramps():
    a0 = S.aug_at(0.0, mix_prob=(0.0, 0.8), randaug=(5, 15), drop_path=(0.0, 0.1))
    a1 = S.aug_at(1.0, mix_prob=(0.0, 0.8), randaug=(5, 15), drop_path=(0.0, 0.1))
    assert (a0.mix_prob, a0.randaug_mag, a0.drop_path) == (0.0, 5, 0.0)
    assert (a1.mix_prob, a1.randaug_mag, a1.drop_path) == pytest.approx((0.8, 15, 0.1))


# ---------------------------------------------------------------- budget clock

class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_budget_clock_excludes_validation_and_resumes():
    fc = FakeClock()
    c = BudgetClock(100.0, clock=fc)
    fc.t += 10
    assert c.counted() == pytest.approx(10)
    with c.excluded() as ex:
        fc.t += 30                                              # validation: not counted
        assert c.counted() == pytest.approx(10)
    assert ex["seconds"] == pytest.approx(30)
    fc.t += 5
    assert c.counted() == pytest.approx(15)
    assert c.counted() / c.budget_s == pytest.approx(0.15)
    assert c.excluded_s == pytest.approx(30)
    c2 = BudgetClock(100.0, counted_s=15.0, clock=fc)           # resumed process
    fc.t += 1
    assert c2.counted() == pytest.approx(16)


# ---------------------------------------------------------------- planner

def _segments():
    return build_stages(curriculum=[(64, 0.5), (128, 1.0)], keep_kind="linear", keep_min=0.5,
                          keep_full_from=0.75, keep_cycles=1, keep_step=0.25, splits_per_stage=2,
                          base_batch=64, ref_res=128, const_tokens=True, max_batch=512, lr_rule="linear")


def test_build_stages_cover_window_with_full_keep_at_end():
    segs = _segments()
    assert segs[0].f0 == 0.0 and segs[-1].f1 == 1.0
    assert all(a.f1 == b.f0 for a, b in zip(segs, segs[1:]))
    assert segs[-1].keep == 1.0 and segs[-1].res == 128 and segs[-1].batch_size == 64
    assert [s.res for s in segs][0] == 64
    keeps = [s.keep for s in segs if s.res == 128]
    assert keeps == sorted(keeps)
    assert segs[0].batch_size > segs[-1].batch_size                       # const tokens: bigger batch at low res
    assert segs[0].lr_scale == segs[0].batch_size / 64


def test_plan_time_budget_ends_on_budget():
    segs = _segments()
    speeds = {s.shape: 1000.0 * 128 / s.res / s.keep for s in segs}   # faster at low res / low keep
    plan = plan_budget(segs, speeds=speeds, budget_s=600.0, setup_s=60.0, reserve_s=6.0)
    assert plan.window_s == pytest.approx(534.0)
    planned_time = sum(s.steps * s.batch_size / s.speed for s in plan.stages)
    assert planned_time == pytest.approx(534.0, rel=0.02)
    for s in plan.stages:                                      # each gets its share of the time
        assert s.steps * s.batch_size / s.speed == pytest.approx((s.f1 - s.f0) * 534.0, abs=s.batch_size / s.speed)
    assert plan.progress_at(0) == 0.0 and plan.progress_at(plan.total_steps) == 1.0
    from fastvit.data.curriculum import stretches      # what the loader makes of the plan: keep-only
    st = stretches(plan.stages)                        # changes share one batch order
    assert st[0].res == 64 and [s.res for s in st] == [64, 128] and sum(s.steps for s in st) == plan.total_steps
    again = Plan.from_dict(plan.to_dict())                       # saved plan → same plan
    assert again.total_steps == plan.total_steps and again.stages == plan.stages


def test_plan_image_budget_and_too_small():
    segs = _segments()
    plan = plan_budget(segs, budget_images=64_000)
    assert plan.images_until(plan.total_steps) == pytest.approx(64_000, rel=0.02)
    with pytest.raises(BudgetTooSmall):
        plan_budget(segs, speeds={s.shape: 1.0 for s in segs}, budget_s=10.0, setup_s=12.0)
    with pytest.raises(ValueError):
        plan_budget(segs, budget_s=10.0)                          # no speeds measured


def test_probe_with_fake_clock_and_oom_halving():
    fc = FakeClock()
    secs_per_image = {64: 0.001, 128: 0.004}
    ran = []

    class OOM(RuntimeError):
        pass

    def run_step(st):
        if st.res == 128 and st.batch_size > 32:
            raise OOM("CUDA out of memory")
        ran.append((st.res, st.keep, st.batch_size))
        fc.t += st.batch_size * secs_per_image[st.res] * st.keep

    logged = []
    a, b = Stage(64, 128, keep=0.5, lr_scale=2.0), Stage(128, 64, keep=1.0)
    fb = BatchFallback(base_batch=64, lr_rule="sqrt")
    fitted, speeds = fit_and_probe([a, b, a], run_step, fc, fallback=fb, iters=4,
                                   is_oom=lambda e: isinstance(e, OOM), on_halve=lambda o, n: logged.append(n.batch_size))
    assert speeds[a.shape] == pytest.approx(1 / 0.0005)
    assert fitted[0] is a and fitted[2] is a
    assert (fitted[1].res, fitted[1].batch_size) == (128, 32)      # halved once, logged
    assert fitted[1].lr_scale == pytest.approx(math.sqrt(0.5))     # the run's LR rule for the new batch
    assert logged == [32]
    assert speeds[fitted[1].shape] == pytest.approx(1 / 0.004)      # probed at the batch it will train at
    assert ran.count((64, 0.5, 128)) == 5                          # duplicates probed once: 1 warm-up + 4
    with pytest.raises(OutOfMemory, match="even at batch 2"):
        fit_and_probe([Stage(128, 4)], lambda st: (_ for _ in ()).throw(OOM("out of memory")), fc,
                      fallback=fb, is_oom=lambda e: isinstance(e, OOM))
    # an image budget needs no speeds: warm-up only (compile + fit)
    fitted, speeds = fit_and_probe([b], run_step, fc, fallback=fb, iters=0, is_oom=lambda e: isinstance(e, OOM))
    assert speeds == {} and fitted[0].batch_size == 32


def test_replan_on_drift_keeps_done_steps_and_ends_on_budget():
    segs = _segments()
    speeds = {s.shape: 2000.0 for s in segs}
    plan = plan_budget(segs, speeds=speeds, budget_s=1000.0, setup_s=0.0, reserve_s=0.0)
    step = plan.stages[0].steps // 2
    # the run is really 20% slower: half of segment 0 took 20% longer than planned
    t_done = plan.progress_at(step) * 1000.0 * 1.25
    assert drifted(2000.0, 1600.0) and not drifted(2000.0, 1900.0)
    new = replan(plan, step=step, counted_s=t_done, speed_ratio=0.8)
    assert new.stages[0].steps == step                          # done steps kept as they were
    assert new.progress_at(step - 1) == plan.progress_at(step - 1)
    remaining_time = sum(s.steps * s.batch_size / s.speed for s in new.stages[1:])
    assert t_done + remaining_time == pytest.approx(1000.0, rel=0.02)  # still ends on the budget
    assert new.total_steps < plan.total_steps
    assert new.replans and new.replans[-1]["step"] == step
    assert new.stages[-1].keep == 1.0 and new.stages[-1].f1 == 1.0
    # way behind: later segments collapse but the final one keeps ≥ 1 step
    late = replan(plan, step=step, counted_s=999.0, speed_ratio=0.1)
    assert late.total_steps >= step + 1 and late.stages[-1].steps >= 1
    # out of memory: halved batch at res 128, LR scaled, steps doubled for the same images
    oom = replan(plan, step=step, counted_s=plan.progress_at(step) * 1000.0, speed_ratio=1.0,
                 new_batch={s.kind: 32 for s in plan.stages if s.res == 128}, base_batch=64, lr_rule="linear")
    s128 = [s for s in oom.stages if s.res == 128]
    assert all(s.batch_size == 32 for s in s128)
    old128 = [s for s in plan.stages if s.res == 128]
    assert s128[-1].lr_scale == pytest.approx(old128[-1].lr_scale / 2)
    # the run's own rule, as the planned segments and the probe fallback use (sqrt by default)
    sq = replan(plan, step=step, counted_s=plan.progress_at(step) * 1000.0, speed_ratio=1.0,
                new_batch={s.kind: 32 for s in plan.stages if s.res == 128}, base_batch=64, lr_rule="sqrt")
    assert all(s.lr_scale == pytest.approx(math.sqrt(32 / 64)) for s in sq.stages if s.res == 128)
    with pytest.raises(ValueError):
        replan(plan, step=step, counted_s=0.0, speed_ratio=1.0, new_batch={plan.stages[-1].kind: 32})   # no rule


def test_replan_when_ahead_stretches_to_the_budget():
    """The under-run case: a run that is ahead of its plan gets more steps, not an early end."""
    segs = _segments()
    plan = plan_budget(segs, speeds={s.shape: 2000.0 for s in segs}, budget_s=1000.0, setup_s=0.0, reserve_s=0.0)
    step = plan.stages[1].steps // 2 + plan.stages[0].steps
    t_done = plan.progress_at(step) * 1000.0 / 1.25                 # 25% faster so far
    new = replan(plan, step=step, counted_s=t_done, speed_ratio=1.25)
    assert t_done + remaining_planned_s(new, step) == pytest.approx(1000.0, rel=0.01)
    assert new.total_steps > plan.total_steps
    assert new.progress_at(step) == pytest.approx(plan.progress_at(step))   # no schedule jump
    assert all(a.f1 == b.f0 for a, b in zip(new.stages, new.stages[1:]))
    assert new.stages[-1].f1 == 1.0 and new.progress_at(new.total_steps - 1) < 1.0


def _simulate(factor, budget=180.0, setup=5.0, startup=3.0, seed=0):
    """A run on a fake clock: step g really takes batch / (probed speed × factor(t, g)) seconds, the
    loader start-up costs `startup` s on the first step. Returns (end counted s, plan, monitor)."""
    import random

    rnd = random.Random(seed)
    segs = _segments()
    probed = {s.shape: 600.0 * 128 / s.res / s.keep for s in segs}
    reserve = 0.01 * budget
    plan = plan_budget(segs, speeds=probed, budget_s=budget, setup_s=setup, reserve_s=reserve)
    mon = DriftMonitor(budget)
    t, step = setup, 0
    while step < plan.total_steps:
        seg = plan.stages[plan.stage_at(step)[0]]
        t += seg.batch_size / (probed[seg.shape] * factor(t, step, rnd)) + (startup if step == 0 else 0.0)
        step += 1
        mon.step_done(t, seg.batch_size / seg.speed)
        r = mon.check(t, plan, step)
        if r is not None:
            plan = replan(plan, step=step, counted_s=t, speed_ratio=r)
            mon.restart(t)
    return t + 0.2, plan, mon                                          # + the final checkpoint


@pytest.mark.parametrize("case", ["steady", "faster", "slower", "noisy", "swings"])
def test_drift_monitor_ends_on_the_budget_without_thrashing(case):
    factor = {
        "steady": lambda t, g, r: 1.0,                                  # only the start-up is unplanned
        "faster": lambda t, g, r: 1.0 if t < 60 else 1.35,              # the under-run case
        "slower": lambda t, g, r: 1.0 if t < 60 else 0.7,
        "noisy": lambda t, g, r: r.uniform(0.5, 1.5),                   # per-step jitter, mean 1
        "swings": lambda t, g, r: 1.0 if (t // 20) % 2 == 0 else 0.6,  # other jobs come and go
    }[case]
    end, plan, mon = _simulate(factor)
    assert end == pytest.approx(180.0, abs=0.025 * 180), (case, end)   # counted seconds ≈ budget
    assert len(plan.replans) <= {"steady": 2, "faster": 4, "slower": 4, "noisy": 4, "swings": 12}[case], len(plan.replans)
    if case != "steady":
        assert len(plan.replans) >= 1                                         # a >10% drift does re-plan
    assert plan.stages[-1].keep == 1.0 and plan.stages[-1].f1 == 1.0


# ---------------------------------------------------------------- config

def test_config_checks_keys_and_values():
    with pytest.raises(ConfigError, match="unknown config key"):
        TrainConfig.from_dict({"lrr": 1.0})
    with pytest.raises(ConfigError, match="one budget"):
        TrainConfig.from_dict({"hours": 1, "minutes": 3})
    with pytest.raises(ConfigError, match="keep-schedule"):
        TrainConfig.from_dict({"keep_schedule": "zigzag"})
    cfg = make_config("cpu", {"lr": 5e-3, "depth": None})
    assert cfg.optim.lr == 5e-3 and cfg.model.depth == 2 and cfg.model.name == "vit_tiny_local"   # None: the preset's d2-w128
    assert TrainConfig.from_dict({"minutes": 2}).budget_s == 120.0
    with pytest.raises(ConfigError, match="preset"):
        make_config("nope", {})


# ---------------------------------------------------------------- batch augmentations (uint8, device)

def test_mix_batch_keeps_uint8_and_soft_targets_sum_to_one():
    import numpy as np
    import torch

    from fastvit.train.augment import make_mixup, mix_batch, randaugment_groups

    np.random.seed(0)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(8) % 4
    mix = make_mixup(mixup=0.8, cutmix=1.0, label_smoothing=0.1, num_classes=4)
    x0, t0 = mix_batch(mix, x, y, mix_prob=0.0)                  # never mixes: smoothed one-hot
    assert torch.equal(x0, x) and torch.allclose(t0.sum(1), torch.ones(8))
    assert torch.allclose(t0.argmax(1), y) and t0.max() == pytest.approx(0.925)
    changed = 0
    for _ in range(6):
        xm, tm = mix_batch(mix, x, y, mix_prob=1.0)
        assert xm.dtype == torch.uint8 and xm.shape == x.shape
        assert torch.allclose(tm.sum(1), torch.ones(8))
        changed += int(not torch.equal(xm, x))
    assert changed >= 5
    ra = randaugment_groups(x, magnitude=9, num_ops=2, groups=4)
    assert ra.dtype == torch.uint8 and ra.shape == x.shape
    assert randaugment_groups(x, 0) is x


def test_step_meter_logs_mfu_from_the_flop_count():
    """MFU = training FLOPs per image (fwd + bwd, the model's own count) × images/s ÷ the GPU's peak;
    None where no peak is known (CPU)."""
    from fastvit.models import create_model, train_flops_per_image, vit_forward_flops
    from fastvit.train.metrics import StepMeter, StepTimer

    m = create_model("vit_tiny_local", num_classes=10)
    st = Stage(64, 32, keep=0.5)
    f = train_flops_per_image(m, 64, 0.5)
    assert f == 3 * vit_forward_flops(m.cfg, 64, 8, sparse_locality=True)   # 16 patches at keep 0.5: 8 kept;
    assert train_flops_per_image(m, 64, 0.5, gpu=False) == 3 * vit_forward_flops(m.cfg, 64, 8)   # GPU: sparse conv
    assert train_flops_per_image(m, 64, 0.5, gpu=False) > f
    fc = FakeClock()
    meter = StepMeter(StepTimer(False, fc), window=10, flops_per_image=lambda s: train_flops_per_image(m, s.res, s.keep),
                      peak_flops=1e12, now=0.0)
    for i in range(1, 6):
        meter.step_done(0.5 * i, 32, 1.0, 0.01)                        # 32 images every 0.5 s: 64 img/s
    rec = meter.record(2.5, st)
    assert rec["images_per_s"] == pytest.approx(64.0)
    assert rec["mfu"] == pytest.approx(round(f * 64.0 / 1e12, 4))
    cpu = StepMeter(StepTimer(False, fc), window=10, flops_per_image=lambda s: f, peak_flops=None, now=0.0)
    cpu.step_done(1.0, 32, 1.0, 0.0)
    cpu.step_done(2.0, 32, 1.0, 0.0)
    assert cpu.record(2.0, st)["mfu"] is None
    from fastvit.sysinfo import peak_flops

    assert peak_flops("NVIDIA H200") == 790e12 and peak_flops("cpu: AMD EPYC") is None


def test_oom_in_an_image_plan_cuts_the_stage_and_keeps_history():
    """Out of memory at step 40 of an --epochs plan: the 40 steps served keep their batch, progress and
    images; the rest runs at half the batch with twice the steps (same images), the LR by the rule."""
    from fastvit.train.planner import halve_in_plan

    plan = plan_budget([Stage(32, 16, keep=1.0, f0=0.0, f1=1.0)], budget_images=1600)
    assert plan.total_steps == 100
    new, old, half = halve_in_plan(plan, step=40, counted_s=0.0, fallback=BatchFallback(16, "sqrt"))
    assert (old.batch_size, half.batch_size) == (16, 8)
    assert new.images_until(40) == plan.images_until(40) == 640
    assert new.progress_at(40) == pytest.approx(plan.progress_at(40))
    assert [(s.batch_size, s.steps) for s in new.stages] == [(16, 40), (8, 120)]
    assert new.images_until(new.total_steps) == 1600
    assert new.stages[1].lr_scale == pytest.approx(math.sqrt(0.5))
    assert BatchFallback(16, "sqrt").halve(Stage(32, 6)).batch_size == 2    # halving keeps mixup pairs: even
