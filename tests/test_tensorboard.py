"""TensorBoard by default: a tiny run leaves event files in RUN_DIR/tb holding every logged scalar
(read back with tensorboard's EventAccumulator); --no-tensorboard turns them off; a writer that fails
says one line and turns itself off without stopping the run."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from fastvit.train.cli import build_parser, config_from_args, main  # noqa: E402
from fastvit.train.metrics import MetricsWriter  # noqa: E402
from fastvit.train.tensorboard import TensorBoardWriter  # noqa: E402

TINY = ["--preset", "test", "--device", "cpu", "--backend", "dali", "--no-progress"]


def _scalars(tb_dir) -> dict:
    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})     # 0: keep every event
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_a_run_writes_the_logged_scalars(tiny_prepped, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)       # the PyTorch reference embedding: fast on CPU
    run = tmp_path / "run"
    assert main(["--data", str(tiny_prepped), "--out", str(run), "--epochs", "4", "--evals", "1", *TINY]) == 0
    assert list((run / "tb").glob("events.out.tfevents.*"))
    got = _scalars(run / "tb")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val"]
    for key in ("loss", "lr", "images_per_s", "data_wait", "keep", "res", "batch"):
        want = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        assert want, key
        assert [s for s, _ in got[f"train/{key}"]] == [s for s, _ in want], key          # every logged step
        assert [v for _, v in got[f"train/{key}"]] == pytest.approx([v for _, v in want], rel=1e-6), key
    assert len(val) == 2                                          # a periodic and the final validation
    res = json.loads((run / "results.json").read_text())
    assert [s for s, _ in got["val/top1"]] == [r["step"] for r in val]
    assert got["val/top1"][-1][1] == pytest.approx(res["top1"]) and "val/ema_top1" in got


def test_no_tensorboard_flag_and_the_runs_own_setting(tmp_path):
    cfg = config_from_args(build_parser().parse_args(["--data", "d", "--minutes", "1", "--no-tensorboard"]))
    assert cfg.run.tensorboard is False
    assert config_from_args(build_parser().parse_args(["--data", "d", "--minutes", "1"])).run.tensorboard is True
    off = tmp_path / "off"
    off.mkdir()
    (off / "config.json").write_text(json.dumps(cfg.to_dict()))   # what the trainer writes before logging
    w = MetricsWriter(off)
    w.log({"kind": "train", "step": 1, "loss": 2.0})
    w.close()
    assert not (off / "tb").exists() and (off / "metrics.jsonl").read_text()
    on = tmp_path / "on"
    w = MetricsWriter(on, tensorboard=True)
    w.log({"kind": "train", "step": 1, "loss": 2.0, "lr": 0.1, "depth": None})
    w.log({"kind": "val", "step": 1, "top1": 50.0})
    w.close()
    got = _scalars(on / "tb")
    assert got["train/loss"] == [(1, 2.0)] and got["val/top1"] == [(1, 50.0)] and "train/depth" not in got


def test_a_failing_writer_says_one_line_and_turns_off(tmp_path, capsys):
    said = []
    w = TensorBoardWriter(tmp_path / "run", say=said.append)
    assert w.on

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    w._w.add_scalar = broken
    w.log({"kind": "train", "step": 1, "loss": 1.0})             # no exception: the run goes on
    w.log({"kind": "train", "step": 2, "loss": 1.0})
    w.close()
    assert not w.on and len(said) == 1 and "tensorboard: off" in said[0] and "No space left" in said[0]
    blocked = tmp_path / "file"
    blocked.write_text("not a dir")                              # RUN_DIR/tb cannot be created
    said.clear()
    w = TensorBoardWriter(blocked, say=said.append)
    assert not w.on and len(said) == 1
    w.log({"kind": "train", "step": 1, "loss": 1.0})
    w.close()


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint(tmp_path):
    """metrics.jsonl is cut back to the checkpoint's step on resume; the event files say the same
    (purge_step): TensorBoard shows each step once, from the run that continued."""
    run = tmp_path / "run"
    w = MetricsWriter(run, tensorboard=True)
    for step in range(1, 6):
        w.log({"kind": "train", "step": step, "loss": 10.0 + step})
    w.close()
    w = MetricsWriter(run, resume_step=3, tensorboard=True)       # killed after step 5, checkpoint at 3
    for step in range(4, 7):
        w.log({"kind": "train", "step": step, "loss": 20.0 + step})
    w.close()
    assert _scalars(run / "tb")["train/loss"] == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0), (6, 26.0)]
