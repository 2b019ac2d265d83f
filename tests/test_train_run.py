"""fastvit-train end to end on the tiny prepped dataset (CPU): a run whose loss falls, kill -9 then
--resume reaching the same planned steps, a corrupt last checkpoint, the baseline recipe, NaN losses,
and one-line errors for the user's mistakes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastvit.manifest import SOURCE_KEY
from fastvit.train import checkpoint as C
from fastvit.train.cli import main

TINY = ["--preset", "test", "--device", "cpu", "--backend", "dali", "--no-progress"]


@pytest.fixture(autouse=True)
def _reference_patch_embed(monkeypatch):
    """Train with the PyTorch reference embedding: conftest sets TRITON_INTERPRET=1 for the kernel
    tests, and the Triton interpreter would make every training step take seconds on CPU."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _rows(run: Path, kind="train"):
    return [r for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_tiny_run_loss_falls_and_writes_results(tiny_prepped, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["--data", str(tiny_prepped), "--out", str(run), "--epochs", "12", "--evals", "1", *TINY])
    assert rc == 0
    res = json.loads((run / "results.json").read_text())
    for key in ("top1", "top5", "ema_top1", "ema_top5", "budget_s", "counted_s", "steps", "planned_steps",
                "images_seen", "device_name", "stages"):
        assert key in res, key
    assert res["steps"] == res["planned_steps"] == json.loads((run / "plan.json").read_text())["total_steps"]
    assert res["images_seen"] == 12 * 64 // 16 * 16
    assert res["val_images"] == 24                               # the full val split
    assert all({"res", "keep", "batch_size", "steps"} <= set(s) for s in res["stages"])
    assert any(s["keep"] < 1 for s in res["stages"]) and res["stages"][-1]["keep"] == 1.0
    from fastvit.train.planner import Plan

    plan = Plan.from_dict(json.loads((run / "plan.json").read_text()))   # progress means one thing: the
    assert all(r["p"] == round(plan.progress_at(r["step"] - 1), 5) for r in _rows(run))   # plan's, as logged
    losses = [r["loss"] for r in _rows(run) if r["loss"] is not None]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.2, (first, last)                    # it learns
    assert res["top1"] > 25.0                                   # above chance (4 classes)
    assert len(_rows(run, "val")) == 2                          # one periodic + the final validation
    assert (run / "curves.png").stat().st_size > 10_000
    assert (run / "metrics.csv").read_text().startswith("kind,step,")
    assert len(C.checkpoint_paths(run)) == 1                    # the final checkpoint
    assert "final top-1" in capsys.readouterr().out


def test_time_budget_run_plans_with_probe(tiny_prepped, tmp_path):
    run = tmp_path / "run"
    rc = main(["--data", str(tiny_prepped), "--out", str(run), "--minutes", "0.25", "--evals", "0", *TINY])
    assert rc == 0
    res = json.loads((run / "results.json").read_text())
    plan = json.loads((run / "plan.json").read_text())
    assert plan["mode"] == "time" and plan["setup_s"] > 0
    assert all(s["speed"] > 0 for s in plan["stages"])        # probed
    assert res["steps"] == res["planned_steps"] == plan["total_steps"]
    assert res["budget_s"] == 15.0
    assert 0.95 * 15 <= res["counted_s"] <= 1.05 * 15           # ends on the budget, within 5%


def test_compiled_run_uses_one_static_graph_per_shape(tiny_prepped, tmp_path):
    import torch

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run = tmp_path / "run"
    rc = main(["--data", str(tiny_prepped), "--out", str(run), "--epochs", "1", "--evals", "0", "--compile",
               "--keep-min", "1", "--curriculum", "32:1", *TINY])
    assert rc == 0
    res = json.loads((run / "results.json").read_text())
    assert res["compile_s"] > 0 and res["steps"] == 64 // 16
    # compiled at the shape's first call in the planner's warm-up, no recompile in the loop (same call
    # form, shape and drop-path rate)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def _wait_for(pred, timeout, proc):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_kill9_then_resume_reaches_planned_steps_and_skips_corrupt_checkpoint(tiny_prepped, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastvit.train.cli", "--data", str(tiny_prepped), "--out", str(run),
           "--epochs", "16", "--ckpt-every-steps", "4", "--evals", "0", *TINY]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        ok = _wait_for(lambda: len(C.checkpoint_paths(run)) >= 2, 240, proc)
        assert ok, "the run never wrote two checkpoints: " + (proc.stderr.read().decode()[-2000:]
                                                              if proc.poll() is not None else "timeout")
        os.kill(proc.pid, signal.SIGKILL)                       # no chance to clean up
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert not (run / "results.json").exists()
    planned = json.loads((run / "plan.json").read_text())["total_steps"]
    ckpts = C.checkpoint_paths(run)
    newest, previous = ckpts[0], ckpts[1]
    prev_step = C.load_checkpoint(previous)["step"]
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])                  # truncated newest checkpoint
    # a fresh run refuses to clobber the unfinished one
    assert main(["--data", str(tiny_prepped), "--out", str(run), "--epochs", "2", *TINY]) == 2
    msgs = []
    from fastvit.train.loop import train

    res = train(C_load_cfg(run), resume=True, log=msgs.append)
    assert any("trying the previous one" in m for m in msgs)
    assert any(f"step {prev_step}" in m for m in msgs)          # resumed from the previous checkpoint
    assert res["steps"] == res["planned_steps"] == planned == 16 * 64 // 16
    steps = [r["step"] for r in _rows(run)]
    assert steps == sorted(steps) and len(steps) == len(set(steps))   # no duplicate rows after the crash


def C_load_cfg(run):
    from fastvit.train.config import TrainConfig

    return TrainConfig.from_dict({"out": str(run), "progress": False})


def test_corrupt_checkpoint_detected_and_previous_used(tmp_path):
    C.save_checkpoint(tmp_path, 1, {"step": 1})
    C.save_checkpoint(tmp_path, 2, {"step": 2})
    C.save_checkpoint(tmp_path, 3, {"step": 3})
    assert [p.name for p in C.checkpoint_paths(tmp_path)] == ["ckpt_00000003.pt", "ckpt_00000002.pt"]  # last two
    newest = C.checkpoint_paths(tmp_path)[0]
    b = bytearray(newest.read_bytes())
    b[len(b) // 3] ^= 0xFF                                      # one flipped byte: torch.load may not notice
    newest.write_bytes(bytes(b))
    with pytest.raises(C.CorruptCheckpoint):
        C.load_checkpoint(newest)
    st, path = C.load_latest(tmp_path, log=lambda m: None)
    assert st["step"] == 2 and path.name == "ckpt_00000002.pt"
    assert not list(tmp_path.glob("*.tmp"))


def test_baseline_recipe_runs(tiny_prepped, tiny_src, tmp_path):
    run = tmp_path / "base"
    man = json.loads((tiny_prepped / "manifest.json").read_text())
    data = tiny_prepped
    if SOURCE_KEY not in man:
        pytest.skip("the manifest does not record the source tree the torchvision baseline reads")
    rc = main(["--data", str(data), "--out", str(run), "--recipe", "baseline", "--epochs", "3", "--evals", "0",
               *TINY[:-3], "--no-progress"])
    assert rc == 0
    res = json.loads((run / "results.json").read_text())
    assert res["recipe"] == "baseline" and res["backend"] == "torchvision"
    assert [s["keep"] for s in res["stages"]] == [1.0] and res["steps"] == res["planned_steps"] > 0


def test_nan_losses_stop_with_checkpoint(tiny_prepped, tmp_path, monkeypatch, capsys):
    import torch

    import fastvit.train.step as L

    real = L.F.log_softmax
    monkeypatch.setattr(L.F, "log_softmax", lambda x, dim: real(x, dim=dim) * float("nan"))
    run = tmp_path / "nan"
    rc = main(["--data", str(tiny_prepped), "--out", str(run), "--epochs", "10", "--evals", "0", *TINY])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "NaN" in err[-1] and "Traceback" not in "\n".join(err)
    st, _ = C.load_latest(run)
    assert st["nan_total"] == 10 and torch.isfinite(next(iter(st["model"].values()))).all()


def test_user_errors_are_one_line(tiny_prepped, tmp_path, capsys):
    cases = [
        (["--data", str(tmp_path), "--epochs", "1", "--out", str(tmp_path / "a")], "manifest"),
        (["--data", str(tmp_path / "nope"), "--epochs", "1", "--out", str(tmp_path / "b")], "does not exist"),
        (["--data", str(tiny_prepped), "--out", str(tmp_path / "c")], "budget"),
        (["--out", str(tmp_path / "d"), "--resume"], "nothing to resume"),
        (["--data", str(tiny_prepped), "--epochs", "1", "--out", str(tmp_path / "e"), "--curriculum", "40:1"],
         "multiple"),
    ]
    for argv, words in cases:
        assert main(argv + TINY) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    nosplit = _variant(tiny_prepped, tmp_path / "nosplit", lambda man: man["splits"].pop("val"))
    assert main(["--data", str(nosplit), "--epochs", "1", "--out", str(tmp_path / "f"), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'val' split" in err[0]


def test_every_evaluation_starts_at_the_first_val_image(tiny_prepped, tmp_path, monkeypatch):
    """Capped periodic validations stop mid-epoch; the next one (and the final, full one) must start at
    the beginning of the val split again, and raw and EMA weights must be scored on the same images."""
    from fastvit.data.base import BatchLoader
    from fastvit.train.config import make_config
    from fastvit.train.evaluate import Evaluator
    from fastvit.train.loop import train

    calls: list[list] = []                       # per validation: (global batch index, labels) read
    real_next, real_validate = BatchLoader.next_batch, Evaluator.__call__

    def next_batch(self):
        g = self.next_index
        batch = real_next(self)
        if not self.train and calls:
            calls[-1].append((g, batch[1].tolist()))
        return batch

    def validate(self, *a, **k):
        calls.append([])
        return real_validate(self, *a, **k)

    monkeypatch.setattr(BatchLoader, "next_batch", next_batch)
    monkeypatch.setattr(Evaluator, "__call__", validate)
    cfg = make_config("test", dict(data=str(tiny_prepped), out=str(tmp_path / "run"), device="cpu", backend="dali",
                                   epochs=3, evals=2, eval_images=8, progress=False))
    res = train(cfg, log=lambda m: None)
    assert len(calls) == 3                                       # two periodic + the final validation
    full = calls[-1]
    assert [g for g, _ in full] == [0, 1] and sum(len(b) for _, b in full) == 24   # val split: 24 images, 16 a batch
    for periodic in calls[:-1]:
        assert periodic == full[:1]                              # one batch covers the cap, for raw and EMA alike
    assert res["val_images"] == 24 and res["ema_top1"] is not None
    vals = _rows(tmp_path / "run", "val")
    assert [r["val_images"] for r in vals] == [16, 16, 24]


def _variant(tiny_prepped, dst: Path, edit) -> Path:
    """A data dir reading tiny_prepped's shards (symlinked) through an edited manifest."""
    dst.mkdir()
    for sub in ("ffcv", "dali"):
        (dst / sub).symlink_to(tiny_prepped / sub, target_is_directory=True)
    man = json.loads((tiny_prepped / "manifest.json").read_text())
    edit(man)
    (dst / "manifest.json").write_text(json.dumps(man))
    return dst


def test_loader_failures_are_one_line_exit_2(tiny_prepped, tmp_path, capsys):
    """DataErrors from the set-up check, the val loader (opened after training) and a train stage built in the
    background (surfacing at next(it)) end as one line and exit 2, not a traceback."""
    def no_val_dali(m):
        m["splits"]["val"].pop("dali")                          # the val shard is missing for --backend dali

    def val_count(m):
        m["splits"]["val"]["count"] -= 1                        # .idx files disagree with the manifest

    def train_count(m):
        m["splits"]["train"]["count"] -= 1

    for name, edit, words in [("noval", no_val_dali, "val"), ("valcount", val_count, "val"),
                              ("traincount", train_count, "train")]:
        data = _variant(tiny_prepped, tmp_path / name, edit)
        rc = main(["--data", str(data), "--out", str(tmp_path / f"run_{name}"), "--epochs", "1", "--evals", "0", *TINY])
        err = capsys.readouterr().err.strip().splitlines()
        err = [e for e in err if not e.startswith("[fastvit-train]")]   # the run's own log lines
        assert rc == 2, (name, err)
        assert len(err) == 1 and err[0].startswith("fastvit-train: error:") and words in err[0], (name, err)
        assert "samples" in err[0] or "no dali" in err[0], err[0]


def test_oom_mid_run_halves_batch_and_scales_lr_by_the_configured_rule(tiny_prepped, tmp_path, monkeypatch):
    import math

    from fastvit.train import schedules as S
    from fastvit.train.config import make_config
    from fastvit.train.loop import train
    from fastvit.train.step import TrainStep

    real = TrainStep.__call__
    hit = []

    def train_step(self, images, *a, **k):
        if not hit and not k.get("probe"):
            hit.append(images.shape[0])
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(self, images, *a, **k)

    monkeypatch.setattr(TrainStep, "__call__", train_step)
    cfg = make_config("test", dict(data=str(tiny_prepped), out=str(tmp_path / "run"), device="cpu", backend="dali",
                                   epochs=1, keep_min=1.0, curriculum="32:1", evals=0, lr_scaling="sqrt", progress=False))
    msgs: list[str] = []
    res = train(cfg, log=msgs.append)
    assert hit == [16]
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert [s["batch_size"] for s in plan["stages"]] == [8]
    assert plan["stages"][0]["lr_scale"] == pytest.approx(math.sqrt(0.5))
    assert plan["stages"][0]["lr_scale"] == pytest.approx(S.lr_scale_for_batch(8, 16, "sqrt"))
    assert any("out of GPU memory" in m and "sqrt" in m and "0.707" in m for m in msgs), msgs
    assert res["steps"] == res["planned_steps"] == 64 // 8


def test_rerun_into_a_finished_run_needs_overwrite(tiny_prepped, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--data", str(tiny_prepped), "--out", str(run), "--epochs", "1", "--evals", "0",
            "--keep-min", "1", "--curriculum", "32:1", *TINY]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert "results.json" in before and "metrics.jsonl" in before
    capsys.readouterr()
    assert main(argv) == 2                                      # finished: refused, nothing touched
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finished run" in err[0] and "--overwrite" in err[0], err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    (run / "results.json").unlink()                             # unfinished (checkpoint, metrics): refused too
    assert main(argv) == 2
    assert "unfinished run" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]
    assert main(argv + ["--overwrite"]) == 0                    # replaced on request
    assert json.loads((run / "results.json").read_text())["steps"] == 64 // 16


def test_resume_warns_about_flags_the_saved_config_overrides(tiny_prepped, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--data", str(tiny_prepped), "--out", str(run), "--epochs", "1", "--evals", "0",
                 "--keep-min", "1", "--curriculum", "32:1", *TINY]) == 0
    capsys.readouterr()
    assert main(["--out", str(run), "--resume", "--lr", "0.5", "--minutes", "3", "--no-progress"]) == 0
    warn = [line for line in capsys.readouterr().err.splitlines() if "ignored" in line]
    assert len(warn) == 1 and "--lr" in warn[0] and "--minutes" in warn[0] and "--out" not in warn[0] \
        and "--no-progress" not in warn[0] and "--progress" not in warn[0], warn
    assert json.loads((run / "results.json").read_text())["budget_s"] is None   # still the saved --epochs run


def test_metrics_record_compute_time_and_plan_keeps_probe_speed(tiny_prepped, tmp_path):
    """Each log record carries the steps' compute seconds next to their wall seconds (the GPU-busy
    share's parts); the plan keeps the probe's images/s apart from the (re-planned) speed."""
    run = tmp_path / "run"
    assert main(["--data", str(tiny_prepped), "--out", str(run), "--minutes", "0.1", "--evals", "0",
                 "--keep-min", "1", "--curriculum", "32:1", *TINY]) == 0
    rows = _rows(run)
    assert rows and all(0 < r["interval_compute_s"] <= r["interval_s"] + 1e-5 for r in rows[1:])
    plan = json.loads((run / "plan.json").read_text())
    assert all(s["probe_speed"] > 0 for s in plan["stages"])
    assert "interval_compute_s" in (run / "metrics.csv").read_text().splitlines()[0]


def test_e2e_gpu_busy_is_profiled_kernel_time_over_wall_unclipped(monkeypatch):
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    e2e = importlib.import_module("sections.e2e")

    def row(seg, s, compute, images=64, wait=0.1):
        return {"kind": "train", "stage": seg, "res": 32, "keep": 1.0, "interval_s": s, "interval_wait_s": wait,
                "interval_images": images, "interval_compute_s": compute}

    rows = [row(0, 9.0, 0.1), row(0, 1.0, 0.5), row(0, 1.0, 0.3)]   # the first interval (compile) is left out
    prof = {"kind": "profile", "res": 32, "keep": 1.0}
    rows += [dict(prof, busy_s=0.2, wall_s=1.0), dict(prof, busy_s=0.9, wall_s=1.0)]   # two windows, pooled
    # re-planned speed (what the old metric divided by) differs from the probe's: only the probe counts
    plan = {"stages": [{"res": 32, "keep": 1.0, "speed": 64.0, "probe_speed": 50.0}]}
    m = e2e.stage_metrics(rows, plan, cuda=True)
    assert m["e2e/gpu_busy@32,keep1"] == pytest.approx(0.55)        # the profiler's, not the events'
    assert m["e2e/step_span_share@32,keep1"] == pytest.approx(0.4)
    assert m["e2e/images_per_s@32,keep1"] == pytest.approx(64.0)
    assert m["e2e/speed_over_probe@32,keep1"] == pytest.approx(64.0 / 50.0)   # > 1 shown, not clipped
    cpu = e2e.stage_metrics(rows, plan, cuda=False)
    assert "e2e/gpu_busy@32,keep1" not in cpu and cpu["e2e/cpu_op_busy@32,keep1"] == pytest.approx(0.55)


def test_missing_val_shard_is_found_before_training(tiny_prepped, tmp_path, capsys):
    """A val split without files for the chosen backend is reported at set-up (one line, exit 2), before
    the budget is spent, through the dataset's own check (PreppedDataset.require_split)."""
    from fastvit.data import open_dataset

    def no_val_dali(m):
        m["splits"]["val"].pop("dali")

    data = _variant(tiny_prepped, tmp_path / "noval", no_val_dali)
    ds = open_dataset(data)
    assert ds.require_split("train", 32, "dali") == 32 and ds.require_split("val", 32, "ffcv") == 32
    assert ds.require_split("val", 48, "any") == 64
    with pytest.raises(Exception, match="no dali files"):
        ds.require_split("val", 32, "dali")
    run = tmp_path / "run"
    assert main(["--data", str(data), "--out", str(run), "--epochs", "1", "--evals", "0", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no dali files" in err[0] and "'val'" in err[0], err
    assert not (run / "metrics.jsonl").exists()                 # nothing trained
