"""The trainer's fault matrix (docs/faults.md "Faults: training"): for each fault, the outcome (a one-line error
with its exit code, or a recovery) and the work lost, on the tiny prepped data (CPU).

kill -9 and SIGTERM hit a real fastvit-train process: `RUNNER` patches one place of the trainer to
write a marker file and block there (a checkpoint write, a stage switch, a validation, the probe), the
test waits for the marker and sends the signal. Then --resume must reach the planned steps with no
duplicate metric rows. Each test prints a `FAULT` line with the work it measured as lost (pytest -s)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastvit.train import checkpoint as C
from fastvit.train.cli import main

TINY = ["--preset", "test", "--device", "cpu", "--backend", "dali", "--no-progress"]

# python -c RUNNER ARGV...: fastvit-train with one place patched to block (FV_HOOK) after writing FV_MARK
RUNNER = r"""
import os, sys, time
from pathlib import Path

hook, mark = os.environ.get("FV_HOOK", ""), Path(os.environ.get("FV_MARK", "/nonexistent/mark"))


def block(what):
    mark.write_text(what)
    time.sleep(600)                       # until the test's signal arrives


if hook == "ckpt_write":                  # the second checkpoint is half written when the kill comes
    import fastvit.train.checkpoint as C
    from fastvit.fileio import tmp_name
    real = C.write_bytes_atomic

    def write(path, data):
        if C.checkpoint_paths(path.parent):
            tmp_name(path).write_bytes(data[: len(data) // 2])
            block(path.name)
        real(path, data)
    C.write_bytes_atomic = write
elif hook == "stage":                     # the first stage switch (new_stage is called at step 0 too)
    from fastvit.train.metrics import StepMeter
    real, calls = StepMeter.new_stage, []

    def new_stage(self):
        calls.append(1)
        if len(calls) == 2:
            block("stage")
        real(self)
    StepMeter.new_stage = new_stage
elif hook == "val":                       # the first periodic validation
    from fastvit.train.evaluate import Evaluator

    Evaluator.__call__ = lambda self, *a, **k: block("val")
elif hook == "probe":                     # compile + probe, before any training
    import fastvit.train.run_planner as P

    P.fit_and_probe = lambda *a, **k: block("probe")
from fastvit.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(autouse=True)
def _reference_patch_embed(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _rows(run: Path, kind="train"):
    if not (run / "metrics.jsonl").exists():
        return []
    return [r for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip())
            if r["kind"] == kind]


def _no_duplicates(run: Path) -> list[int]:
    steps = [r["step"] for r in _rows(run)]
    assert steps == sorted(steps) and len(steps) == len(set(steps)), steps
    return steps


def _errors(err: str) -> list[str]:
    """stderr without the run's own log lines: what the user sees as the outcome."""
    return [e for e in err.strip().splitlines() if e and not e.startswith("[fastvit-train]")]


def _fault(name: str, **measured) -> None:
    print(f"\nFAULT {name}: " + ", ".join(f"{k}={v}" for k, v in measured.items()))


class Proc:
    """A fastvit-train subprocess through RUNNER, blocked at FV_HOOK when `mark` appears."""

    def __init__(self, argv: list, hook: str, mark: Path):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(FV_HOOK=hook, FV_MARK=str(mark))
        self.mark = mark
        self.p = subprocess.Popen([sys.executable, "-c", RUNNER, *argv], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, env=env)

    def wait_for(self, pred, timeout=300.0) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if pred():
                return
            if self.p.poll() is not None:
                pytest.fail(f"exited {self.p.returncode} first: {self.p.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        self.p.kill()
        pytest.fail("timed out")

    def blocked(self) -> None:
        self.wait_for(self.mark.exists)

    def signal(self, sig, timeout=60.0) -> tuple[int, str, float]:
        """Send `sig`; (exit code, stderr, seconds until it exited)."""
        t0 = time.time()
        os.kill(self.p.pid, sig)
        try:
            _, err = self.p.communicate(timeout=timeout)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()
        return self.p.returncode, err.decode(), time.time() - t0


def _resume(run: Path, **kw):
    from fastvit.train.config import TrainConfig
    from fastvit.train.loop import train

    msgs: list[str] = []
    res = train(TrainConfig.from_dict({"out": str(run), "progress": False}), resume=True, log=msgs.append, **kw)
    assert res["steps"] == res["planned_steps"] == json.loads((run / "plan.json").read_text())["total_steps"]
    _no_duplicates(run)
    return res, msgs


def _argv(data, run, *extra):
    return ["--data", str(data), "--out", str(run), "--evals", "0", *extra, *TINY]


# ------------------------------------------------------------------------------------------------------
# the checkpoint interval


def test_checkpoint_interval_scales_with_the_budget():
    """The smaller of --ckpt-minutes (10; cpu preset 5) and 5% of the budget, at least 30 s apart; --epochs:
    every 5% of the planned steps (30 s apart at least); --ckpt-every-steps adds checkpoints."""
    def sched(budget_s, minutes=10.0, every_steps=0):
        return C.CheckpointSchedule(minutes=minutes, every_steps=every_steps, budget_s=budget_s, step=0, now=0.0)

    assert sched(120.0).every_s == 30.0                    # a 2-minute run: every 30 s, not every 10 min
    assert sched(1800.0).every_s == 90.0                   # 30 minutes: 5%
    assert sched(24 * 3600.0).every_s == 600.0             # a day: 10 minutes
    assert sched(3600.0, minutes=5.0).every_s == 180.0 and sched(7200.0, minutes=5.0).every_s == 300.0
    assert sched(3600.0, minutes=0.5).every_s == 30.0      # an explicit shorter interval wins
    s = sched(120.0)
    assert not s.due(10, 100, 29.0) and s.due(10, 100, 30.5)
    s.done(10, 30.5)
    assert not s.due(11, 100, 59.0) and s.due(11, 100, 61.0)
    e = sched(None)                                        # --epochs, 1000 planned steps: every 50 steps
    assert not e.due(49, 1000, 100.0) and e.due(50, 1000, 100.0)
    assert not e.due(50, 1000, 29.0)                       # ... but not sooner than 30 s after the last
    assert e.due(3, 1000, 601.0)                           # ... and at least every --ckpt-minutes
    assert sched(None, every_steps=4).due(8, 1000, 0.1)


# ------------------------------------------------------------------------------------------------------
# kill -9 and SIGTERM (real processes)


@pytest.mark.slow
def test_kill9_during_a_checkpoint_write_resumes_from_the_previous_one(tiny_prepped, tmp_path):
    run, mark = tmp_path / "run", tmp_path / "mark"
    proc = Proc(_argv(tiny_prepped, run, "--epochs", "4", "--ckpt-every-steps", "4"), "ckpt_write", mark)
    proc.blocked()
    assert list(run.glob("ckpt_*.pt.tmp-*"))                         # half of the second one on disk
    proc.signal(signal.SIGKILL)
    done = max(_no_duplicates(run))
    assert [C.load_checkpoint(p)["step"] for p in C.checkpoint_paths(run)] == [4]   # the previous one, intact
    res, msgs = _resume(run)
    assert any("resuming from ckpt_00000004.pt" in m for m in msgs)
    assert not list(run.glob("*.tmp-*"))                             # the half-written file is gone
    _fault("kill -9 during a checkpoint write", steps_lost=done - 4, planned=res["planned_steps"])


@pytest.mark.slow
def test_kill9_at_a_stage_switch_resumes(tiny_prepped, tmp_path):
    run, mark = tmp_path / "run", tmp_path / "mark"
    proc = Proc(_argv(tiny_prepped, run, "--epochs", "4", "--ckpt-every-steps", "2"), "stage", mark)
    proc.blocked()
    proc.signal(signal.SIGKILL)
    plan = json.loads((run / "plan.json").read_text())
    switch = plan["stages"][0]["steps"]
    done = max(_no_duplicates(run))
    assert done == switch and len({(s["res"], s["keep"]) for s in plan["stages"]}) > 1
    ck = C.load_checkpoint(C.checkpoint_paths(run)[0])["step"]
    res, _ = _resume(run)
    assert [s["steps"] for s in res["stages"]] == [s["steps"] for s in plan["stages"] if s["steps"] > 0]
    _fault("kill -9 at a stage switch", steps_lost=done - ck, planned=res["planned_steps"])


@pytest.mark.slow
def test_kill9_in_validation_before_any_checkpoint_and_a_second_training_refused(tiny_prepped, tmp_path, capsys):
    """The issue's first case: killed before the first checkpoint, the supervisor's same command line with
    --resume starts from the beginning (one line), the killed run's config.json wins. While the first
    process runs, a second training in the same dir is refused with one line (exit 2), and the lock of
    the killed process does not block the resume."""
    run, mark = tmp_path / "run", tmp_path / "mark"
    argv = ["--data", str(tiny_prepped), "--out", str(run), "--epochs", "4", "--evals", "1", *TINY]
    proc = Proc(argv, "val", mark)
    proc.blocked()
    assert not C.checkpoint_paths(run)                               # the default interval: none yet
    capsys.readouterr()
    for second in (argv, argv + ["--resume"], argv + ["--overwrite"]):
        assert main(second) == 2
        err = _errors(capsys.readouterr().err)
        assert err == [f"fastvit-train: error: {run} is in use by another fastvit-train (pid {proc.p.pid})"], err
    proc.signal(signal.SIGKILL)
    done = max(_no_duplicates(run))
    assert main(argv + ["--resume", "--lr", "0.5"]) == 0                # a changed flag: the saved config wins
    err = capsys.readouterr().err
    assert f"[fastvit-train] no checkpoint in {run}: starting from the beginning" in err.splitlines()
    assert "--lr" in next(line for line in err.splitlines() if "ignored" in line)
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 3e-3
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == res["planned_steps"] == 16
    assert _no_duplicates(run) == list(range(1, 17))
    _fault("kill -9 in validation, no checkpoint yet", steps_lost=done, planned=16)


@pytest.mark.slow
def test_sigterm_mid_run_checkpoints_within_seconds_and_exits_143(tiny_prepped, tmp_path):
    run = tmp_path / "run"
    proc = Proc(_argv(tiny_prepped, run, "--epochs", "30"), "", tmp_path / "mark")
    proc.wait_for(lambda: len(_rows(run)) >= 5)
    rc, err, took = proc.signal(signal.SIGTERM)
    last = _errors(err)
    assert rc == 143 and len(last) == 1 and "Traceback" not in err, err[-2000:]
    ck = C.load_checkpoint(C.checkpoint_paths(run)[0])
    assert last[0] == f"fastvit-train: terminated: checkpoint at step {ck['step']} written; continue with --resume"
    done = max(_no_duplicates(run))
    assert ck["step"] == done and not (run / "results.json").exists()
    assert took < 20, took                                           # within seconds (a loaded 2-core machine)
    res, _ = _resume(run)
    assert res["planned_steps"] == 30 * 4
    _fault("SIGTERM in the training loop", steps_lost=done - ck["step"], exit_s=round(took, 2))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["val", "probe"])
def test_sigterm_in_validation_or_probe_ends_at_once(tiny_prepped, tmp_path, where):
    """SIGTERM where the loop does not look (a validation, the compile + probe): the run ends at once; a
    validation first writes the checkpoint of what was trained, the probe had nothing to keep."""
    run, mark = tmp_path / "run", tmp_path / "mark"
    proc = Proc(["--data", str(tiny_prepped), "--out", str(run), "--epochs", "4", "--evals", "1", *TINY], where, mark)
    proc.blocked()
    rc, err, took = proc.signal(signal.SIGTERM)
    last = _errors(err)
    assert rc == 143 and len(last) == 1 and "Traceback" not in err, err[-2000:]
    assert took < 20, took
    if where == "val":
        step = C.load_checkpoint(C.checkpoint_paths(run)[0])["step"]
        assert step == max(_no_duplicates(run)) == 8
        assert last[0] == f"fastvit-train: terminated: checkpoint at step {step} written; continue with --resume"
        _resume(run)
    else:
        assert "nothing new trained" in last[0] and not C.checkpoint_paths(run)
        assert main(["--data", str(tiny_prepped), "--out", str(run), "--epochs", "1", "--resume", *TINY]) == 0
    _fault(f"SIGTERM in {where}", steps_lost=0, exit_s=round(took, 2))


# ------------------------------------------------------------------------------------------------------
# disk, files and bad input (in-process)


def test_disk_full_while_writing_a_checkpoint(tiny_prepped, tmp_path, monkeypatch, capsys):
    """No space for the second checkpoint: one line (exit 1) naming the run dir and the error, the first
    checkpoint intact, no half-written file left (it would hold the space); --resume once space is free."""
    import signal as S

    from fastvit.fileio import tmp_name

    real = C.write_bytes_atomic

    def full(path, data):
        if C.checkpoint_paths(path.parent):
            tmp_name(path).write_bytes(data[: len(data) // 3])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_name(path)))
        real(path, data)

    monkeypatch.setattr(C, "write_bytes_atomic", full)
    run = tmp_path / "run"
    before = S.getsignal(S.SIGTERM)
    assert main(_argv(tiny_prepped, run, "--epochs", "4", "--ckpt-every-steps", "4")) == 1
    assert S.getsignal(S.SIGTERM) is before                         # train() put the previous handler back
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and "No space left on device" in err[0] and str(run) in err[0] \
        and "ckpt_00000004.pt is intact" in err[0], err
    assert [C.load_checkpoint(p)["step"] for p in C.checkpoint_paths(run)] == [4]
    assert not list(run.glob("*.tmp-*")) and not (run / "results.json").exists()
    done = max(_no_duplicates(run))
    monkeypatch.setattr(C, "write_bytes_atomic", real)              # space freed
    _resume(run)
    _fault("disk full at a checkpoint", steps_lost=done - 4)


def test_newest_checkpoint_corrupt_and_every_checkpoint_corrupt(tiny_prepped, tmp_path, capsys):
    """A corrupt newest checkpoint: the previous one is used (also test_kill9_then_resume_... in
    test_train_run). None readable: --resume starts from the beginning and the unreadable files go (they
    would otherwise outrank the new run's checkpoints)."""
    run = tmp_path / "run"
    argv = _argv(tiny_prepped, run, "--epochs", "2", "--ckpt-every-steps", "2", "--keep-min", "1",
                 "--curriculum", "32:1")
    assert main(argv) == 0
    (run / "results.json").unlink()
    ckpts = C.checkpoint_paths(run)
    ckpts[0].write_bytes(ckpts[0].read_bytes()[:100])
    res, msgs = _resume(run)
    assert any("trying the previous one" in m for m in msgs) and any("step 6" in m for m in msgs)
    (run / "results.json").unlink()
    for p in C.checkpoint_paths(run):
        p.write_bytes(b"garbage")
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 0
    assert "starting from the beginning" in capsys.readouterr().err
    assert [C.load_checkpoint(p)["step"] for p in C.checkpoint_paths(run)] == [8, 6]
    _fault("newest checkpoint corrupt", steps_lost=2)


def _copy_data(tiny_prepped, dst: Path) -> Path:
    shutil.copytree(tiny_prepped, dst)
    return dst


def _remove_when_training_starts(monkeypatch, *paths: Path) -> dict:
    """Move `paths` away once the plan is made (just before the first train loader opens)."""
    import fastvit.train.loop as L

    real, moved = L._open_loader, {}

    def open_loader(*a, **k):
        if not moved:
            for p in paths:
                moved[p] = p.with_name(p.name + ".away")
                p.rename(moved[p])
        return real(*a, **k)

    monkeypatch.setattr(L, "_open_loader", open_loader)
    return moved


def _restore(moved: dict) -> None:
    for p, away in moved.items():
        away.rename(p)


def test_a_shard_deleted_after_training_started(tiny_prepped, tmp_path, monkeypatch, capsys):
    """The next stage's shard is gone when its loader is built: one line (exit 2) with a checkpoint of the
    steps trained so far; --resume continues once the file is back."""
    data = _copy_data(tiny_prepped, tmp_path / "data")
    moved = _remove_when_training_starts(monkeypatch, data / "dali" / "train_64_000000.tar")
    run = tmp_path / "run"
    assert main(_argv(data, run, "--epochs", "2", "--curriculum", "32:0.5,64:0.5", "--final-res", "64",
                      "--keep-min", "1")) == 2
    err = _errors(capsys.readouterr().err)
    switch = json.loads((run / "plan.json").read_text())["stages"][0]["steps"]
    assert len(err) == 1 and "train_64_000000.tar" in err[0] and \
        f"checkpoint at step {switch} written; continue with --resume" in err[0], err
    assert max(_no_duplicates(run)) == switch == C.load_checkpoint(C.checkpoint_paths(run)[0])["step"]
    _restore(moved)
    res, _ = _resume(run)
    assert {s["res"] for s in res["stages"]} == {32, 64}
    _fault("a shard deleted after training started", steps_lost=0)


def test_the_manifest_deleted_after_training_started(tiny_prepped, tmp_path, monkeypatch, capsys):
    """The manifest is read once at set-up: the run finishes without it. A --resume while it is gone is
    one line (exit 2) and changes nothing; once restored, it continues."""
    data = _copy_data(tiny_prepped, tmp_path / "data")
    moved = _remove_when_training_starts(monkeypatch, data / "manifest.json")
    run = tmp_path / "run"
    assert main(_argv(data, run, "--epochs", "2", "--ckpt-every-steps", "4")) == 0
    (run / "results.json").unlink()                                 # as if killed after the final checkpoint
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["--out", str(run), "--resume", "--no-progress"]) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and "manifest" in err[0], err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    _restore(moved)
    _resume(run)
    _fault("manifest deleted after training started", steps_lost=0)


def test_the_val_split_deleted_after_training_started(tiny_prepped, tmp_path, monkeypatch, capsys):
    """Found by the final validation: one line (exit 2), the final checkpoint written; --resume runs only
    the validation once the files are back. (Missing at set-up: refused before training, see
    test_train_run.test_missing_val_shard_is_found_before_training.)"""
    data = _copy_data(tiny_prepped, tmp_path / "data")
    moved = _remove_when_training_starts(monkeypatch, data / "dali" / "val_32_000000.tar",
                                         data / "dali" / "val_32_000000.idx")
    run = tmp_path / "run"
    assert main(_argv(data, run, "--epochs", "2")) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and "val loader" in err[0] and "checkpoint at step 8 written" in err[0], err
    _restore(moved)
    res, msgs = _resume(run)
    assert any("step 8" in m for m in msgs) and res["val_images"] == 24
    _fault("val split deleted after training started", steps_lost=0)


def test_nan_losses_for_a_few_steps_are_skipped(tiny_prepped, tmp_path, monkeypatch):
    """Fewer than NAN_LIMIT NaN steps in a row: skipped (no update), the run finishes. NAN_LIMIT in a row:
    test_train_run.test_nan_losses_stop_with_checkpoint (exit 1, checkpoint of the last good weights)."""
    import torch

    import fastvit.train.step as L

    real, calls = L.F.log_softmax, []

    def log_softmax(x, dim):
        calls.append(1)
        return real(x, dim=dim) * (float("nan") if 6 <= len(calls) < 11 else 1.0)   # 5 steps after the probe

    monkeypatch.setattr(L.F, "log_softmax", log_softmax)
    run = tmp_path / "run"
    assert main(_argv(tiny_prepped, run, "--epochs", "4", "--keep-min", "1", "--curriculum", "32:1")) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["nan_skipped"] == 5 and res["steps"] == 16
    st, _ = C.load_latest(run)
    assert all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())
    _fault("NaN losses for 5 steps", steps_lost=5)


def test_a_read_only_run_dir_is_one_line_before_any_compute(tiny_prepped, tmp_path, monkeypatch, capsys):
    import fastvit.train.loop as L
    import fastvit.train.rundir as R

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:     # root writes anyway: the answer access(2) gives any other user (or on a ro mount)
        real = R.os.access
        monkeypatch.setattr(R.os, "access", lambda p, m: False if Path(p) == ro and m & os.W_OK else real(p, m))
    opened: list = []
    monkeypatch.setattr(L, "open_env", lambda *a: opened.append(1))
    for out, words in [(ro, f"{ro} is not writable"), (ro / "new" / "run", f"cannot create {ro / 'new' / 'run'}: "
                                                                          f"{ro} is not writable")]:
        assert main(["--data", str(tiny_prepped), "--out", str(out), "--epochs", "1", *TINY]) == 2
        err = _errors(capsys.readouterr().err)
        assert len(err) == 1 and words in err[0], err
    assert not opened and not list(ro.iterdir())
    ro.chmod(0o755)
    _fault("read-only run dir", steps_lost=0)


def test_resume_with_nothing_there_starts_a_new_run(tiny_prepped, tmp_path, capsys):
    """A supervisor's first start uses the same command line as its restarts (--resume included)."""
    run = tmp_path / "run"
    argv = _argv(tiny_prepped, run, "--epochs", "1", "--keep-min", "1", "--curriculum", "32:1", "--resume")
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert f"[fastvit-train] no checkpoint in {run}: starting from the beginning" in err
    assert json.loads((run / "results.json").read_text())["steps"] == 4
    assert main(argv) == 0                                          # finished: resumes at its final checkpoint
    assert main(["--out", str(tmp_path / "empty"), "--resume", "--no-progress"]) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and "nothing to resume" in err[0] and "budget" in err[0], err
