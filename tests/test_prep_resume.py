"""Interrupted runs: kill -9 halfway, Ctrl-C, a corrupted finished file; the rerun resumes and the result
is byte-identical to an uninterrupted run.

To stop a run at a known point without hooks in the library, one source "image" is a named pipe: the
worker that opens it blocks until the test lets it go, so the shards before it are finished and the
one holding it is half-written when the signal arrives.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastvit.data_prep import prep_dataset
from fastvit.data_prep.verify import verify_dataset

SHARD = 20  # with 16-image chunks: shard 1 is images 20-35 (one chunk) then 36-39, which holds the pipe


def cli(src: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "fastvit.data_prep.cli", "--src", str(src), "--out", str(out), "--res", "32,64",
            "--workers", str(workers), "--shard-size", str(SHARD), "--no-progress"]


def wait_for(pred, timeout: float = 90.0) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("the prep run did not reach the expected point")
        time.sleep(0.02)


def release(fifo: Path) -> None:
    """Let a reader blocked on the pipe go (it then reads an empty file)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:  # no reader left
        pass


@pytest.fixture
def src_with_pipe(tiny_src, tmp_path) -> tuple[Path, Path, Path]:
    src = tmp_path / "src"
    shutil.copytree(tiny_src, src)
    cls = sorted((src / "train").iterdir())[2]          # third of four classes: mid-way through train
    donor = sorted(cls.iterdir())[5]
    fifo = donor.with_name(donor.stem + "_pipe.JPEG")  # sorts right after the donor
    os.mkfifo(fifo)
    return src, fifo, donor


def processes_writing(out: Path) -> list[int]:
    """Pids whose command line names `out` (the prep run and its forked workers)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if str(out).encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def kill_9_when(proc: subprocess.Popen, reached, settle: float = 0.0) -> None:
    """SIGKILL `proc` once reached() holds (`settle` s later); it must still be running then."""
    try:
        wait_for(lambda: reached() or proc.poll() is not None)
        time.sleep(settle)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def finished_shards(out: Path) -> list[Path]:
    return sorted((out / ".work").glob("train_*.json"))


def test_kill_9_then_resume(src_with_pipe, tmp_path):
    src, fifo, donor = src_with_pipe
    out = tmp_path / "out"
    proc = subprocess.Popen(cli(src, out, workers=2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # the pipe is image 38 of train: shard 0 finishes, shard 1 is half-written when the pipe blocks
    kill_9_when(proc, lambda: finished_shards(out) and any(".tmp-" in p.name for p in (out / "dali").iterdir()),
                settle=0.3)
    # the workers die with the main process (none lingers holding OUT's lock or blocked on the pipe)
    wait_for(lambda: not processes_writing(out), timeout=10)
    release(fifo)
    assert not (out / "manifest.json").exists()
    records = finished_shards(out)
    assert len(records) == 1
    done_files = {rel for r in records for rel in json.loads(r.read_text())["files"]}
    finals = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and ".tmp-" not in p.name
              and p.parent.name in ("dali", "ffcv")}
    assert finals == done_files, "a file under its final name must be a finished one"
    assert any(".tmp-" in p.name for p in (out / "dali").iterdir()), "shard 1 was being written"
    stamps = {rel: (out / rel).stat().st_mtime_ns for rel in done_files}

    fifo.unlink()
    shutil.copy(donor, fifo)  # the pipe becomes a real image; same file list, same settings
    r = subprocess.run(cli(src, out, workers=2), capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    assert {rel: (out / rel).stat().st_mtime_ns for rel in done_files} == stamps, "finished shards are reused"
    assert not any(".tmp-" in p.name for p in out.rglob("*")) and not (out / ".work").exists()
    rep = verify_dataset(out)
    assert rep.ok, rep.problems

    # byte-identical to one uninterrupted run (with another worker count)
    fresh = prep_dataset(src, tmp_path / "fresh", resolutions=[32, 64], workers=1, progress=False, shard_size=SHARD)
    resumed = json.loads((out / "manifest.json").read_text())
    assert resumed["files"] == fresh["files"]
    assert resumed["splits"] == fresh["splits"]

    # a finished file corrupted after the fact: the rerun redoes that split and the result verifies
    victim = out / resumed["splits"]["val"]["dali"]["64"]["tars"][0]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    m = prep_dataset(src, out, resolutions=[32, 64], workers=1, progress=False, shard_size=SHARD)
    assert m["files"] == fresh["files"]
    assert verify_dataset(out, decode=False).ok


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_leaves_no_finished_looking_file(src_with_pipe, tmp_path, workers):
    src, fifo, _ = src_with_pipe
    out = tmp_path / "out"
    # SIGINT at its default in the child, whatever the test runner inherited: a shell without job control
    # starts background jobs (`make test &`, `nohup ... &`) with SIGINT ignored, and the child would inherit it
    proc = subprocess.Popen(cli(src, out, workers=workers), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: (finished_shards(out) and any(".tmp-" in p.name for p in (out / "dali").iterdir()))
                 or proc.poll() is not None)
        time.sleep(0.3)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)  # the blocked open() is interrupted; Python raises KeyboardInterrupt
        time.sleep(0.2)
        release(fifo)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        release(fifo)
    assert proc.returncode == 130, err.decode()
    lines = err.decode().strip().splitlines()
    assert lines[-1].startswith("fastvit-prep: error: interrupted") and "Traceback" not in err.decode()
    assert not (out / "manifest.json").exists()
    assert not any(".tmp-" in p.name for p in out.rglob("*")), "the interrupted shard's files were removed"
    wait_for(lambda: not processes_writing(out), timeout=10)


def test_disk_full_is_one_line_and_resumable(tiny_src, tmp_path, monkeypatch):
    """ENOSPC in the middle of a shard: PrepError (exit 1), no half file under a final name, rerun resumes."""
    import errno

    from fastvit import fileio as files
    from fastvit.data_prep import PrepError

    real_write, calls = files.HashingWriter.write, {"n": 0}

    def full_after_a_while(self, b):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, b)

    monkeypatch.setattr(files.HashingWriter, "write", full_after_a_while)
    out = tmp_path / "out"
    with pytest.raises(PrepError, match="disk full") as ei:
        prep_dataset(tiny_src, out, resolutions=[32], workers=1, progress=False, shard_size=SHARD)
    assert ei.value.exit_code == 1
    assert not any(".tmp-" in p.name for p in out.rglob("*"))
    done = {rel for r in finished_shards(out) for rel in json.loads(r.read_text())["files"]}
    assert done and {str(p.relative_to(out)) for p in (out / "dali").iterdir()} == done
    monkeypatch.setattr(files.HashingWriter, "write", real_write)
    m = prep_dataset(tiny_src, out, resolutions=[32], workers=1, progress=False, shard_size=SHARD)
    assert verify_dataset(out, decode=False).ok and m["splits"]["train"]["count"] == 64
