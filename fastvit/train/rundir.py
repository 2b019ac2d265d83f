"""Run-directory policy: a new run, `--overwrite`, `--resume`, and what a run leaves behind.

A run dir holds checkpoints (ckpt_*.pt, the last two), plan.json, config.json (the resolved config),
metrics.jsonl/.csv, results.json and curves.png. Nothing of a previous run is touched unless the
user says so: a finished run (results.json) or an unfinished one (checkpoints, metrics) is refused
without --overwrite, and under --overwrite its files are removed only after the new run's data and
settings were checked (`start`), so a typo never costs a finished run.

`--resume` with no readable checkpoint (a run killed before its first one, or a supervisor's first
start with the same command line as every restart) starts from the beginning, saying so in one line.
One training at a time: `RunLock` holds RUN_DIR/.lock (flock) for the run; the kernel drops it when the
process dies, kill -9 included, so a stale file never blocks a resume.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from fastvit.fileio import write_bytes_atomic

from .checkpoint import Checkpoint, checkpoint_paths
from .errors import TrainError

RUN_FILES = ("results.json", "plan.json", "curves.png", "config.json", "metrics.jsonl", "metrics.csv")


def open_for_resume(run_dir: Path, log) -> Checkpoint | None:
    """The newest checkpoint that reads back intact (a corrupt newest one is reported and skipped);
    None when there is none (`no_checkpoint` says what happens then)."""
    got = Checkpoint.latest(run_dir, log)
    if got is None:
        return None
    ck, path = got
    log(f"resuming from {path.name}: step {ck.step}, {ck.counted_s:.1f} counted s")
    return ck


def no_checkpoint(run_dir: Path, resume: bool, has_budget: bool, log) -> None:
    """A run without a checkpoint to continue needs a budget; --resume then starts it from the beginning."""
    if not has_budget:
        raise TrainError(f"nothing to resume in {run_dir}: no readable checkpoint; give a budget (--hours, "
                         "--minutes or --epochs) to start it from the beginning" if resume else
                         "give a budget: --hours H, --minutes M or --epochs N", 2)
    if resume:
        log(f"no checkpoint in {run_dir}: starting from the beginning")


def saved_config(run_dir: Path) -> dict | None:
    """config.json of a run killed before its first checkpoint (None if absent or unreadable)."""
    try:
        return json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None


def previous_run(run_dir: Path, overwrite: bool, restart: bool = False) -> list[Path]:
    """The files of a run already in `run_dir` (to remove under --overwrite, or when --resume found no
    checkpoint to continue: `restart`); refused otherwise. A finished run needs --overwrite."""
    prior = checkpoint_paths(run_dir) + [run_dir / n for n in RUN_FILES if (run_dir / n).is_file()]
    if prior and not overwrite:
        if (run_dir / "results.json").is_file():
            raise TrainError(f"{run_dir} holds a finished run (results.json): pass --overwrite to "
                             "replace it, or choose another --out", 2)
        if not restart:
            raise TrainError(f"{run_dir} holds an unfinished run: pass --resume to continue it, "
                             "--overwrite to start over, or choose another --out", 2)
    return prior


def start(run_dir: Path, prior: list[Path], log, lock: "RunLock") -> None:
    """Create the run dir and hold its lock; remove a previous run's files (--overwrite, or --resume
    with nothing to resume; after every check passed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock.hold()
    if prior:
        log(f"starting over in {run_dir}: the previous run's files are replaced")
        for p in prior:
            p.unlink(missing_ok=True)


class RunLock:
    """RUN_DIR/.lock, locked (flock, exclusive) while a training uses the dir. Entered before anything
    else: a read-only or unwritable run dir is refused at once (exit 2), and an existing lock file is
    locked then, so a second training is refused before any compute; `hold()` (in `start`) locks a new
    dir and writes this process's id into the file. A refused run changes nothing in the dir."""

    NAME = ".lock"

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._f = None

    def __enter__(self) -> "RunLock":
        d = self.run_dir
        if d.exists() and not d.is_dir():
            raise TrainError(f"--out {d} is a file, not a directory", 2)
        top = next((p for p in (d, *d.parents) if p.exists()), Path("."))
        if not os.access(top, os.W_OK | os.X_OK):
            what = f"{d} is" if top == d else f"cannot create {d}: {top} is"
            raise TrainError(f"{what} not writable (read-only or no permission)", 2)
        if (d / self.NAME).is_file():
            self._lock("r")
        return self

    def _lock(self, mode: str) -> None:
        path = self.run_dir / self.NAME
        try:
            f = open(path, mode)
        except OSError as e:
            raise TrainError(f"cannot write to {self.run_dir}: {e.strerror}", 2) from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            try:
                pid = path.read_text().strip() or "?"
            except OSError:
                pid = "?"
            raise TrainError(f"{self.run_dir} is in use by another fastvit-train (pid {pid})", 2) from None
        self._f = f

    def hold(self) -> None:
        if self._f is None:
            self._lock("a")
        try:
            (self.run_dir / self.NAME).write_text(f"{os.getpid()}\n")
        except OSError as e:
            raise TrainError(f"cannot write to {self.run_dir}: {e.strerror}", 2) from None

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            self._f.close()           # closing the file releases the lock
            self._f = None


def write_json(run_dir: Path, name: str, obj) -> None:
    write_bytes_atomic(run_dir / name, json.dumps(obj, indent=2).encode())
