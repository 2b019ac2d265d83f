"""Settings and errors of a prep run: `PrepOptions` (checked against known keys), `PrepError`.

Everything that changes the bytes written is part of `settings_fingerprint`: a rerun resumes only when
it matches, and refuses (unless --overwrite) when it does not.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastvit.settings import ConfigError, from_dict

from ..augspec import DEFAULT_AUG
from . import codec

PREP_FORMAT = 2  # bump when the bytes written for the same settings change
FORMATS = ("ffcv", "dali")
WORK = ".work"


class PrepError(Exception):
    """A user error or an unusable input; the message is one line. exit_code: 2 usage, 1 otherwise."""

    def __init__(self, msg: str, exit_code: int = 2):
        super().__init__(msg)
        self.exit_code = exit_code


class TooManyBadImages(PrepError):
    """More than max_bad of the inputs were skipped. The outputs and manifest are written anyway."""

    def __init__(self, msg: str, manifest: dict):
        super().__init__(msg, exit_code=1)
        self.manifest = manifest


@dataclass
class PrepOptions:
    """Every setting of a prep run; unknown keys are refused (see `PrepOptions.make`)."""

    resolutions: tuple = (64, 128, 224)
    formats: tuple = FORMATS
    splits: tuple = ("train", "val")
    quality: int = 90
    workers: int | None = None
    max_bad: float = 0.001
    overwrite: bool = False
    progress: bool = True
    size_ratio: float = DEFAULT_AUG.val_resize_ratio  # 256/224: the val center crop of a stored image is res
    shard_size: int = 5000        # source images per webdataset shard (and per resume unit)
    chunk_size: int = 16          # images per task sent to a worker
    page_size: int | None = None  # FFCV page size; None: FFCV's default (8 MiB), smaller for small files
    use_turbojpeg: bool = True    # False: the Pillow reference path only
    passthrough: bool = True      # keep a source JPEG's bytes where its stored size is its own size

    @classmethod
    def make(cls, **kw) -> "PrepOptions":
        try:
            o = from_dict(cls, kw, what="option")     # the project's one unknown-key check
        except ConfigError as e:                     # a prep usage error (exit 2), same message
            raise PrepError(str(e)) from None
        o.check()
        return o

    def check(self) -> None:
        """Normalize and validate; PrepError with one line on the first problem."""
        try:
            res = [int(r) for r in (self.resolutions if not isinstance(self.resolutions, (int, str))
                                    else str(self.resolutions).split(","))]
        except (TypeError, ValueError):
            raise PrepError(f"resolutions must be positive integers, got {self.resolutions!r}") from None
        if not res or any(r <= 0 or r > 4096 for r in res):
            raise PrepError(f"resolutions must be integers in 1..4096, got {self.resolutions!r}")
        self.resolutions = tuple(sorted(set(res)))
        fmts = tuple(self.formats.split(",") if isinstance(self.formats, str) else self.formats)
        bad = [f for f in fmts if f not in FORMATS]
        if bad or not fmts:
            raise PrepError(f"unknown format(s) {', '.join(map(str, bad)) or '(none)'}; choose from {', '.join(FORMATS)}")
        self.formats = tuple(f for f in FORMATS if f in fmts)
        splits = tuple(self.splits.split(",") if isinstance(self.splits, str) else self.splits)
        if not splits or any(not s or "/" in s or s.startswith(".") for s in splits) or len(set(splits)) != len(splits):
            raise PrepError(f"splits must be distinct folder names, got {self.splits!r}")
        self.splits = splits
        if not (isinstance(self.quality, int) and 1 <= self.quality <= 100):
            raise PrepError(f"quality must be an integer in 1..100, got {self.quality!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise PrepError(f"workers must be a positive integer, got {self.workers!r}")
        if not (0 <= float(self.max_bad) <= 1):
            raise PrepError(f"max_bad is a fraction in [0, 1], got {self.max_bad!r}")
        if not (0.5 <= float(self.size_ratio) <= 4):
            raise PrepError(f"size_ratio must be in [0.5, 4], got {self.size_ratio!r}")
        self.size_ratio = float(self.size_ratio)
        for name in ("shard_size", "chunk_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise PrepError(f"{name} must be a positive integer, got {v!r}")
        if self.page_size is not None and (self.page_size < (1 << 21) or self.page_size & (self.page_size - 1)):
            raise PrepError(f"page_size must be a power of two >= 2 MiB, got {self.page_size!r}")

    def stored_short(self) -> dict[str, int]:
        return {str(r): int(round(r * self.size_ratio)) for r in self.resolutions}


def settings_fingerprint(opts: PrepOptions, src: Path) -> dict:
    """What must match for a rerun to resume (anything that changes the bytes written)."""
    return {"src": str(src.resolve()), "resolutions": list(opts.resolutions), "formats": list(opts.formats),
            "splits": list(opts.splits), "quality": opts.quality, "size_ratio": round(opts.size_ratio, 9),
            "shard_size": opts.shard_size, "page_size": opts.page_size,
            "encoder": codec.encoder_name(opts.use_turbojpeg), "passthrough": opts.passthrough,
            "prep_format": PREP_FORMAT}
