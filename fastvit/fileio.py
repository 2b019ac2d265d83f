"""Files the user keeps: atomic writes (tmp name + fsync + os.replace) and checksums, for every part of fastvit.

A file under its final name is always complete: writers fill `NAME.tmp-<pid>` and rename it at the
end, so an interrupted run (Ctrl-C, kill -9, disk full) leaves only `*.tmp-*` files, which the next
run deletes.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

TMP_MARK = ".tmp-"
HASH = "sha256"


def tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: Path, final: Path) -> None:
    """fsync tmp, rename it over final, fsync the folder: final is either old or complete, never half."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
    commit(tmp, path)


def write_json_atomic(path: Path, obj, compact: bool = False) -> None:
    text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=1)
    write_bytes_atomic(path, (text + "\n").encode())


def file_digest(path: Path, chunk: int = 1 << 22) -> dict:
    """{"bytes": size, "sha256": hex} of a file, read in 4 MiB chunks."""
    h = hashlib.new(HASH)
    n = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
            n += len(b)
    return {"bytes": n, HASH: h.hexdigest()}


class HashingWriter:
    """A binary file written sequentially under a tmp name, hashed as it goes; `commit()` publishes it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp_name(self.path)
        self.f = open(self.tmp, "wb")
        self.h = hashlib.new(HASH)
        self.n = 0

    def write(self, b) -> None:
        self.f.write(b)
        self.h.update(b)
        self.n += len(b)

    def commit(self) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return {"bytes": self.n, HASH: self.h.hexdigest()}

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass


def remove_stale_tmp(root: Path) -> int:
    """Delete `*.tmp-*` files left by interrupted runs under root; returns how many."""
    n = 0
    if not root.is_dir():
        return 0
    for p in root.rglob(f"*{TMP_MARK}*"):
        if p.is_file():
            try:
                p.unlink()
                n += 1
            except OSError:
                pass
    return n
