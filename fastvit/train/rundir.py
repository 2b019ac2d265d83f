"""Run-directory policy: a new run, `--overwrite`, `--resume`, and what a run leaves behind.

A run dir holds checkpoints (ckpt_*.pt, the last two), plan.json, config.json (the resolved config),
metrics.jsonl/.csv, results.json and curves.png. Nothing of a previous run is touched unless the
user says so: a finished run (results.json) or an unfinished one (checkpoints, metrics) is refused
without --overwrite, and under --overwrite its files are removed only after the new run's data and
settings were checked (`start`), so a typo never costs a finished run.
"""
from __future__ import annotations

import json
from pathlib import Path

from fastvit.fileio import write_bytes_atomic

from .checkpoint import checkpoint_paths, load_latest
from .errors import TrainError

RUN_FILES = ("results.json", "plan.json", "curves.png", "config.json", "metrics.jsonl", "metrics.csv")


def open_for_resume(run_dir: Path, log) -> dict:
    """The newest checkpoint that reads back intact (a corrupt newest one is reported and skipped)."""
    got = load_latest(run_dir, log)
    if got is None:
        raise TrainError(f"nothing to resume in {run_dir}: no readable checkpoint", 2)
    ck, path = got
    log(f"resuming from {path.name}: step {ck['step']}, {ck['counted_s']:.1f} counted s")
    return ck


def previous_run(run_dir: Path, overwrite: bool) -> list[Path]:
    """The files of a run already in `run_dir` (to remove under --overwrite); refused without it."""
    prior = checkpoint_paths(run_dir) + [run_dir / n for n in RUN_FILES if (run_dir / n).is_file()]
    if prior and not overwrite:
        if (run_dir / "results.json").is_file():
            raise TrainError(f"{run_dir} holds a finished run (results.json): pass --overwrite to "
                             "replace it, or choose another --out", 2)
        raise TrainError(f"{run_dir} holds an unfinished run: pass --resume to continue it, "
                         "--overwrite to start over, or choose another --out", 2)
    return prior


def start(run_dir: Path, prior: list[Path], log) -> None:
    """Create the run dir; remove a previous run's files (--overwrite, after every check passed)."""
    if prior:
        log(f"starting over in {run_dir} (--overwrite: the previous run's files are replaced)")
        for p in prior:
            p.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def write_json(run_dir: Path, name: str, obj) -> None:
    write_bytes_atomic(run_dir / name, json.dumps(obj, indent=2).encode())
