"""Atomic, self-checking checkpoints; the last two are kept.

File layout: torch.save payload ‖ sha256(payload) (32 bytes) ‖ MAGIC (8 bytes). Written to a temporary
name, fsynced, renamed, and the directory fsynced, so a crash (kill -9, power loss) leaves either the
old or the new file, never half of one. The trailing digest catches a truncated or corrupted file that
torch.load might otherwise read without complaint; `load_latest` then falls back to the previous one.
"""
from __future__ import annotations

import hashlib
import io
import math
import random
import re
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..fileio import remove_stale_tmp, tmp_name, write_bytes_atomic

MAGIC = b"FVCKPT01"
_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


class CorruptCheckpoint(Exception):
    pass


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """Checkpoints in the run dir, newest (highest step) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write `state` as ckpt_<step>.pt atomically; delete all but the newest `keep`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    path = run_dir / f"ckpt_{step:08d}.pt"
    remove_stale_tmp(run_dir)  # a half-written checkpoint of a killed run, never under a final name
    try:
        write_bytes_atomic(path, payload + hashlib.sha256(payload).digest() + MAGIC)
    except BaseException:      # disk full, a signal: the half-written file goes, the previous ones stay
        tmp_name(path).unlink(missing_ok=True)
        raise
    for old in checkpoint_paths(run_dir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict:
    data = Path(path).read_bytes()
    if len(data) < 40 or data[-8:] != MAGIC:
        raise CorruptCheckpoint(f"{path.name}: truncated (no end marker)")
    payload, digest = data[:-40], data[-40:-8]
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptCheckpoint(f"{path.name}: checksum mismatch")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means unusable
        raise CorruptCheckpoint(f"{path.name}: unreadable ({type(e).__name__})") from None


def load_latest(run_dir: Path, log=print) -> tuple[dict, Path] | None:
    """The newest checkpoint file that reads back intact, as its raw dict (a corrupt newest one is
    reported and skipped). `Checkpoint.latest` is the same, validated and typed."""
    return _newest(run_dir, log, load_checkpoint)


def _newest(run_dir: Path, log, read):
    for path in checkpoint_paths(run_dir):
        try:
            return read(path), path
        except CorruptCheckpoint as e:
            log(f"checkpoint {e}; trying the previous one")
    return None


@dataclass
class Checkpoint:
    """What a checkpoint holds: the one owner of its keys. The loop writes one (`write`); resume, --init-from
    and fastvit-eval read one (`read`, `latest`), validated: a file without the keys a run needs is
    reported as corrupt (and `latest` falls back to the previous one)."""
    config: dict                       # the resolved TrainConfig (to_dict)
    model: dict                        # state_dict of the trained module
    opt: dict                          # the optimizer's state_dict
    plan: dict                         # planner.Plan.to_dict()
    step: int                          # steps done
    counted_s: float                   # counted seconds at the checkpoint (the budget's clock)
    rng: dict                          # rng_state()
    ema: dict | None = None            # the EMA's state_dict (None: no EMA)
    evals_done: int = 0                # periodic validations done
    nan_total: int = 0                 # steps skipped for a NaN/inf loss
    val_s: float = 0.0                 # seconds of validation (not counted)
    compile_s: float = 0.0             # seconds of compile + probe (counted)
    ema_halflife_images: float = 0.0   # the EMA's time constant (0: a first-release checkpoint, use the plan's)
    world_size: int = 1                # processes of the run that wrote it
    growth: dict | None = None         # --growth: the Grower's state
    model_auto: dict | None = None     # --model auto: the choice (shape, table, forecast)

    REQUIRED = ("config", "model", "opt", "plan", "step", "counted_s", "rng")

    def to_state(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict, name: str = "checkpoint") -> "Checkpoint":
        if not isinstance(state, dict):
            raise CorruptCheckpoint(f"{name}: not a fastvit checkpoint")
        missing = [k for k in cls.REQUIRED if k not in state]
        if missing:
            raise CorruptCheckpoint(f"{name}: not a fastvit checkpoint (no {', '.join(missing)})")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in state.items() if k in known and v is not None or k in cls.REQUIRED}
        return cls(**kw)

    def load_weights(self, parts) -> None:
        """Model, optimizer and EMA (when both have one) into a run's parts (fastvit.train.setup.Parts)."""
        parts.model.load_state_dict(self.model)
        parts.opt.load_state_dict(self.opt)
        if parts.ema is not None and self.ema is not None:
            parts.ema.module.load_state_dict(self.ema)

    def write(self, run_dir: Path, keep: int = 2) -> Path:
        """ckpt_<step>.pt in run_dir, atomically (save_checkpoint); the newest `keep` are kept."""
        return save_checkpoint(run_dir, self.step, self.to_state(), keep=keep)

    @classmethod
    def read(cls, path: Path) -> "Checkpoint":
        return cls.from_state(load_checkpoint(path), Path(path).name)

    @classmethod
    def latest(cls, run_dir: Path, log=print) -> "tuple[Checkpoint, Path] | None":
        """The newest checkpoint that reads back intact and complete (a bad newest one is reported and
        skipped)."""
        return _newest(run_dir, log, cls.read)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# The checkpoint interval: the smaller of --ckpt-minutes (default 10, cpu preset 5) and 5% of the budget,
# but at least 30 s (a GPU checkpoint with optimizer state takes seconds); --epochs: every 5% of the
# planned steps, at least 30 s apart, at most --ckpt-minutes. --ckpt-every-steps adds checkpoints.
CKPT_MIN_S, CKPT_SHARE = 30.0, 0.05


class CheckpointSchedule:
    """When the loop writes its next checkpoint, and which step the newest one holds."""

    def __init__(self, *, minutes: float, every_steps: int, budget_s: float | None, step: int, now: float):
        cap = 60.0 * minutes
        self.every_s = cap if budget_s is None else min(cap, max(CKPT_MIN_S, CKPT_SHARE * budget_s))
        self.share = CKPT_SHARE if budget_s is None else None
        self.every_steps = every_steps
        self.last_step, self.last_s = step, now

    def due(self, step: int, total_steps: int, now: float) -> bool:
        since = now - self.last_s
        if (self.every_steps and step % self.every_steps == 0) or since >= self.every_s:
            return True
        return self.share is not None and since >= min(CKPT_MIN_S, self.every_s) and \
            step - self.last_step >= max(1, math.ceil(self.share * total_steps))

    def done(self, step: int, now: float) -> None:
        self.last_step, self.last_s = step, now


def init_parts_from(path, parts, log=print) -> Path:
    """--init-from: load a checkpoint's model, optimizer and EMA into `parts` (the plan, step, clock and
    RNG are not taken: the run starts its own). `path` is a checkpoint file or a run dir (its newest)."""
    from .errors import TrainError

    path = Path(path)
    try:
        got = Checkpoint.latest(path, log) if path.is_dir() else (Checkpoint.read(path), path)
    except (OSError, CorruptCheckpoint) as e:
        raise TrainError(f"--init-from {path}: {e}", 2) from None
    if got is None:
        raise TrainError(f"--init-from {path}: no readable checkpoint", 2)
    ck, src = got
    try:
        ck.load_weights(parts)
    except (RuntimeError, ValueError, KeyError) as e:
        raise TrainError(f"--init-from {src}: does not fit this model ({str(e).splitlines()[0]})", 2) from None
    log(f"init from {src} (step {ck.step}, {ck.counted_s:.1f} counted s)")
    return src
