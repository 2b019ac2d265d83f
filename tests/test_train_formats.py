"""One owner per format and rule: the Checkpoint and Results types, the run's small rules, the FLOP count
of a --growth stage at its own depth."""
from __future__ import annotations

import json

import pytest
import torch

from fastvit.train import checkpoint as C
from fastvit.train.results import Results, ResultsError
from fastvit.train.rules import final_resolution, preset_for_device, reserve_s


def _ck(step: int, **more) -> C.Checkpoint:
    return C.Checkpoint(config={"model": {"name": "vit_tiny_local"}}, model={"w": torch.ones(2)}, opt={},
                        plan={"stages": [], "mode": "images"}, step=step, counted_s=1.5 * step, rng=C.rng_state(),
                        **more)


def test_checkpoint_round_trips_and_validates(tmp_path):
    path = _ck(3, nan_total=2, growth={"depth": 2}).write(tmp_path)
    got = C.Checkpoint.read(path)
    assert (got.step, got.counted_s, got.nan_total, got.growth) == (3, 4.5, 2, {"depth": 2})
    assert torch.equal(got.model["w"], torch.ones(2)) and got.ema is None and got.model_auto is None
    # a file without the keys a run needs is corrupt: latest() skips it for the previous one, with a line
    state = _ck(4).to_state()
    del state["plan"]
    C.save_checkpoint(tmp_path, 4, state)
    said = []
    ck, p = C.Checkpoint.latest(tmp_path, said.append)
    assert ck.step == 3 and p.name == "ckpt_00000003.pt"
    assert said == ["checkpoint ckpt_00000004.pt: not a fastvit checkpoint (no plan); trying the previous one"]
    # the raw reader still returns what is in the file
    assert C.load_latest(tmp_path, lambda m: None)[0]["step"] == 4


def test_an_old_checkpoint_without_newer_keys_reads_with_defaults(tmp_path):
    state = _ck(1).to_state()
    for k in ("world_size", "model_auto", "ema_halflife_images"):
        state.pop(k)
    state["ema_halflife_images"] = None                      # the first release wrote None
    ck = C.Checkpoint.read(C.save_checkpoint(tmp_path, 1, state))
    assert (ck.world_size, ck.model_auto, ck.ema_halflife_images) == (1, None, 0.0)


def test_results_read_validates_in_one_line(tmp_path):
    with pytest.raises(ResultsError) as e:
        Results.read(tmp_path)
    assert "\n" not in str(e.value) and "results.json" in str(e.value)
    (tmp_path / "results.json").write_text(json.dumps({"top1": 50.0}))
    with pytest.raises(ResultsError, match="no top5, eval_res"):
        Results.read(tmp_path)
    (tmp_path / "results.json").write_text("{nope")
    with pytest.raises(ResultsError, match="not JSON"):
        Results.read(tmp_path)
    full = {k: 1 for k in Results.REQUIRED} | {"top1": 40.0, "ema_top1": 42.5}
    Results(full).write(tmp_path)
    got = Results.read(tmp_path)
    assert Results.exists(tmp_path) and got["top1"] == 40.0 and got.best_top1() == 42.5
    assert got.to_dict() == full and dict(got.updated(x=1)) == {**full, "x": 1}


def test_rules():
    assert reserve_s(60.0) == pytest.approx(0.3) and reserve_s(24 * 3600.0) == 120.0
    assert preset_for_device("cpu") == "cpu" and preset_for_device("cuda:1") == "gpu"

    class Cfg:
        class data:
            final_res, baseline_res = None, 96

        class run:
            recipe = "baseline"

        class model:
            patch_size = 16
    assert final_resolution(Cfg, [64, 128]) == 96
    Cfg.run.recipe = "fastvit"
    assert final_resolution(Cfg, [64, 128]) == 128


def test_flops_of_a_growth_stage_count_its_own_depth():
    from fastvit.models import create_model, train_flops_per_image

    m = create_model("vit_tiny_local", num_classes=10, depth=4)
    full = train_flops_per_image(m, 64, 1.0)
    assert train_flops_per_image(m, 64, 1.0, depth=4) == full
    half = train_flops_per_image(m, 64, 1.0, depth=2)
    assert 0.4 * full < half < 0.6 * full
