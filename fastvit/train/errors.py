"""The trainer's one error type: a failure the user can act on, printed by the CLI as one line."""
from __future__ import annotations


class TrainError(Exception):
    """code 2 = usage (bad flag, missing data), 1 = runtime (NaN, out of memory at batch 1)."""

    def __init__(self, msg: str, code: int = 1):
        super().__init__(msg)
        self.code = code


class CheckpointFailed(TrainError):
    """A checkpoint could not be written (disk full, read-only): the previous one stays intact, and no
    other checkpoint is tried on the way out."""


def is_oom(e: BaseException) -> bool:
    """A CUDA out-of-memory error (torch raises OutOfMemoryError, older paths a RuntimeError)."""
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())
