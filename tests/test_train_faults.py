"""The trainer's fault paths, each from a bug of the first release: out of memory while a shape compiles
(the probe must halve, not die), the probe's own halving, the EMA's time constant across batch
changes, and the baseline's resolution check."""
from __future__ import annotations

import json
import math

import pytest

from fastvit.train.cli import main

TINY = ["--preset", "test", "--device", "cpu", "--backend", "dali", "--no-progress"]


@pytest.fixture(autouse=True)
def _reference_patch_embed(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _oom_above(monkeypatch, limit: int, seen: list):
    """Every training step (probe, compile warm-up and loop alike) with a batch above `limit` runs out
    of memory, as a too-large batch does on a GPU."""
    from fastvit.train.step import TrainStep

    real = TrainStep.__call__

    def call(self, images, labels, stage, **k):
        seen.append((images.shape[0], k.get("probe", False)))
        if images.shape[0] > limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, images, labels, stage, **k)

    monkeypatch.setattr(TrainStep, "__call__", call)


@pytest.mark.parametrize("budget", [["--epochs", "1"], ["--minutes", "0.15"]])
def test_oom_while_compiling_a_shape_halves_the_batch(tiny_prepped, tmp_path, monkeypatch, capsys, budget):
    """Bug 1 + 2: the first call of a shape (where its graph compiles) runs out of memory at the full
    batch. The planner halves it (LR by the run's rule), probes the halved batch itself (not a small
    stand-in batch), plans with that speed, and the run trains at it."""
    seen: list = []
    _oom_above(monkeypatch, 8, seen)
    run = tmp_path / "run"
    rc = main(["--data", str(tiny_prepped), "--out", str(run), *budget, "--evals", "0", "--compile",
               "--keep-min", "1", "--curriculum", "32:1", "--lr-scaling", "sqrt", *TINY])
    err = capsys.readouterr().err
    assert rc == 0, err[-2000:]
    assert "Traceback" not in err and "out of GPU memory at res 32" in err and "batch 16" in err
    plan = json.loads((run / "plan.json").read_text())
    assert {s["batch_size"] for s in plan["stages"]} == {8}       # (a time plan may be re-planned: cut in two)
    assert all(s["lr_scale"] == pytest.approx(math.sqrt(0.5)) for s in plan["stages"])
    probes = [b for b, probe in seen if probe]
    assert probes[0] == 16 and set(probes[1:]) == {8}              # halved, then probed at 8 itself
    assert all(b == 8 for b, probe in seen if not probe)         # the loop trains at the fitted batch
    if "--minutes" in budget:
        assert plan["stages"][0]["probe_speed"] > 0 and plan["stages"][0]["speed"] > 0


def test_oom_at_the_smallest_batch_is_one_line(tiny_prepped, tmp_path, monkeypatch, capsys):
    _oom_above(monkeypatch, 0, [])
    rc = main(["--data", str(tiny_prepped), "--out", str(tmp_path / "run"), "--epochs", "1", "--evals", "0",
               "--compile", "--keep-min", "1", "--curriculum", "32:1", *TINY])
    err = [e for e in capsys.readouterr().err.strip().splitlines() if not e.startswith("[fastvit-train]")]
    assert rc == 1 and len(err) == 1 and "out of GPU memory even at batch 2" in err[0], err


def test_ema_time_constant_in_images_survives_a_batch_change(tiny_prepped, tmp_path, monkeypatch):
    """Bug 3: the EMA's half-life is a number of images fixed for the run. The decay the EMA applies
    (not just an attribute) follows the step's batch and the images seen: after the batch is halved
    mid-run, each step decays by the square root of a full-batch step (the same decay per image), and
    timm's step-counted warm-up is not in the way."""
    from timm.utils import ModelEmaV3

    from fastvit.train.step import EmaRate, TrainStep

    rate = EmaRate(1000.0)
    assert rate.decay(16) == pytest.approx(rate.decay(8) ** 2) and rate.decay(1000) == pytest.approx(0.5)
    assert rate.decay(16, 50_000) == pytest.approx(rate.decay(8, 50_000) ** 2)     # past the warm-up
    assert rate.decay(8, 0) == 0.0 and rate.decay(8, 200) < rate.decay(8, 20_000)  # warm-up in images
    applied: list = []
    real_get, real_call = ModelEmaV3.get_decay, TrainStep.__call__
    monkeypatch.setattr(ModelEmaV3, "get_decay", lambda self, step=None: (lambda d: (applied.append(d), d)[1])(
        real_get(self, step)))
    hit: list = []

    def call(self, images, labels, stage, **k):
        if not k.get("probe") and not hit and images.shape[0] == 16:
            hit.append(1)
            raise RuntimeError("CUDA out of memory")
        return real_call(self, images, labels, stage, **k)

    monkeypatch.setattr(TrainStep, "__call__", call)
    rc = main(["--data", str(tiny_prepped), "--out", str(tmp_path / "run"), "--epochs", "2", "--evals", "0",
               "--keep-min", "1", "--curriculum", "32:1", *TINY])
    assert rc == 0 and hit
    hl = EmaRate(0.1 * 2 * 64)                                         # test preset: half-life 0.1 of 128 images
    assert applied == pytest.approx([hl.decay(8, 8 * i) for i in range(len(applied))])
    assert len(applied) == 16                                          # 128 images at batch 8


def test_drop_path_rate_survives_an_oom_halving_and_a_resume(tiny_prepped, tmp_path, monkeypatch):
    """The drop-path rate belongs to the stage's kind, not its batch: a halved batch mid-run and a
    resumed run keep training at the configured rate (it fell to 0 when looked up by batch)."""
    from fastvit.models.droppath import DropPathRate
    from fastvit.train import checkpoint as C
    from fastvit.train.step import TrainStep

    rates: list = []
    real_set, real_call = DropPathRate.set, TrainStep.__call__
    monkeypatch.setattr(DropPathRate, "set", lambda self, r: (rates.append(r), real_set(self, r))[1])
    hit: list = []

    def call(self, images, labels, stage, **k):
        if not k.get("probe") and not hit:
            hit.append(images.shape[0])
            raise RuntimeError("CUDA out of memory")
        return real_call(self, images, labels, stage, **k)

    monkeypatch.setattr(TrainStep, "__call__", call)
    run = tmp_path / "run"
    argv = ["--data", str(tiny_prepped), "--out", str(run), "--epochs", "2", "--evals", "0", "--keep-min", "1",
            "--curriculum", "32:1", "--depth", "2", "--drop-path", "0.2", "--ckpt-every-steps", "4", *TINY]
    assert main(argv) == 0 and hit == [16]
    assert rates and all(r == pytest.approx(0.2) for r in rates)
    newest = C.checkpoint_paths(run)[0]
    newest.unlink()                                                    # resume from the one before the end
    (run / "results.json").unlink()
    rates.clear()
    from fastvit.train.config import TrainConfig
    from fastvit.train.loop import train

    res = train(TrainConfig.from_dict({"out": str(run), "progress": False}), resume=True, log=lambda m: None)
    assert rates and all(r == pytest.approx(0.2) for r in rates)
    assert res["steps"] == res["planned_steps"] and {s["batch_size"] for s in res["stages"]} == {8}


def test_baseline_res_must_be_a_patch_multiple(tiny_prepped, tiny_src, tmp_path, capsys):
    """Bug 4: --baseline-res gets the patch-multiple check the main recipe has (one line, exit 2)."""
    rc = main(["--data", str(tiny_prepped), "--out", str(tmp_path / "b"), "--recipe", "baseline", "--epochs", "1",
               "--baseline-res", "40", *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "40" in err[0] and "--baseline-res" in err[0] and "multiple" in err[0], err


def test_overwrite_keeps_a_finished_run_when_the_new_settings_are_bad(tiny_prepped, tmp_path, capsys):
    """--overwrite removes the previous run only after every setting of the new one was checked."""
    run = tmp_path / "run"
    argv = ["--data", str(tiny_prepped), "--out", str(run), "--epochs", "1", "--evals", "0", "--keep-min", "1",
            "--curriculum", "32:1", *TINY]
    assert main(argv) == 0
    before = (run / "results.json").read_bytes()
    capsys.readouterr()
    bad = [a if a != "32:1" else "33:1" for a in argv] + ["--overwrite"]   # not a multiple of the patch
    assert main(bad) == 2 and "multiple" in capsys.readouterr().err
    assert (run / "results.json").read_bytes() == before


def test_out_of_memory_is_recognised_through_the_compiler():
    """An OOM raised while inductor compiles or runs a graph arrives wrapped (BackendCompilerFailed /
    InductorError are RuntimeErrors whose message carries the CUDA error): still an out-of-memory."""
    import torch

    from fastvit.train.errors import is_oom

    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("backend='inductor' raised:\nOutOfMemoryError: CUDA out of memory. Tried to "
                               "allocate 1.50 GiB"))
    assert not is_oom(RuntimeError("shape mismatch")) and not is_oom(ValueError("out of memory"))
