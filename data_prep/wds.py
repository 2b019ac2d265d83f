"""Webdataset tar shards (`KEY.jpg` + `KEY.cls`) with the DALI index beside each tar.

The index is what DALI's `wds2idx` writes (format v1.2): a first line `v1.2 <samples>`, then one line per
sample listing, for each of its files, `<ext> <data offset> <size> <name>`, offsets counting from the
start of the tar to the member's data (after its 512-byte header). Since we write the tar ourselves we
know every offset, so the index is produced alongside it instead of by re-reading the tar.

A key has no dots (webdataset splits a member name at the first dot of its basename).
"""
from __future__ import annotations

import re
import tarfile
from pathlib import Path

from ..fileio import HashingWriter

BLOCK = 512
RECORD = 20 * BLOCK  # tar's record size; the archive is padded to a whole record, as tarfile does
IDX_VERSION = "v1.2"
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(index: int, stem: str) -> str:
    """A unique, dot-free key: the source's position in its split plus a readable part of its name."""
    return f"{index:08d}_{_BAD_KEY_CHARS.sub('_', stem)[:60]}"


def _header_slow(name: str, size: int) -> bytes:
    """The ustar header Python's tarfile writes (reference for `_header`; used for long names)."""
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mode = 0o644
    ti.mtime = 0  # fixed, so the same input gives byte-identical shards (and checksums)
    ti.type = tarfile.REGTYPE
    return ti.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


_TEMPLATE = bytearray(_header_slow("", 0))
_TEMPLATE[148:156] = b"        "  # the checksum is computed with its own field as spaces
_TEMPLATE_SUM = sum(_TEMPLATE)
_TEMPLATE_SIZE_SUM = sum(_TEMPLATE[124:136])


def _header(name: str, size: int) -> bytes:
    """Same bytes as tarfile's USTAR header for a regular file, ~10x faster (one per member matters)."""
    raw = name.encode("ascii")
    if len(raw) > 99 or size >= 8 ** 11:
        return _header_slow(name, size)
    h = bytearray(_TEMPLATE)
    h[0:len(raw)] = raw
    sz = b"%011o\0" % size
    h[124:136] = sz
    h[148:156] = b"%06o\0 " % (_TEMPLATE_SUM + sum(raw) + sum(sz) - _TEMPLATE_SIZE_SUM)
    return bytes(h)


def member(name: str, data: bytes) -> bytes:
    """One tar member: header + data + zero padding to the next 512-byte block."""
    return b"".join((_header(name, len(data)), data, bytes(-len(data) % BLOCK)))


def sample_blob(key: str, jpeg: bytes, label: int) -> tuple[bytes, int]:
    """(tar bytes of KEY.jpg + KEY.cls, length of the .cls payload); built by workers, appended as is."""
    cls = str(int(label)).encode("ascii")
    return member(f"{key}.jpg", jpeg) + member(f"{key}.cls", cls), len(cls)


class ShardWriter:
    """One webdataset tar plus its index, written under tmp names and published by `close()`."""

    def __init__(self, tar_path: Path, idx_path: Path):
        self.tar_path, self.idx_path = Path(tar_path), Path(idx_path)
        self.w = HashingWriter(self.tar_path)
        self.lines: list[str] = []

    def add(self, key: str, jpeg: bytes, label: int) -> tuple[int, int]:
        """Append a sample; returns (offset, size) of its JPEG inside the tar."""
        blob, cls_len = sample_blob(key, jpeg, label)
        return self.add_blob(key, blob, len(jpeg), cls_len)

    def add_blob(self, key: str, blob: bytes, jpeg_len: int, cls_len: int) -> tuple[int, int]:
        """Append a sample_blob(); returns (offset, size) of its JPEG inside the tar."""
        jo = self.w.n + BLOCK
        co = jo + jpeg_len + (-jpeg_len % BLOCK) + BLOCK
        self.w.write(blob)
        self.lines.append(f"jpg {jo} {jpeg_len} {key}.jpg cls {co} {cls_len} {key}.cls")
        return jo, jpeg_len

    def __len__(self) -> int:
        return len(self.lines)

    def close(self) -> tuple[dict, dict]:
        """Finish the tar (two zero blocks, padded to a record) and write the index; returns both digests."""
        end = 2 * BLOCK
        end += -(self.w.n + end) % RECORD
        self.w.write(b"\0" * end)
        tar_digest = self.w.commit()
        idx = HashingWriter(self.idx_path)
        idx.write(f"{IDX_VERSION} {len(self.lines)}\n".encode())
        idx.write(("\n".join(self.lines) + "\n").encode())
        return tar_digest, idx.commit()

    def abort(self) -> None:
        self.w.abort()


def parse_index(text: str, path: Path | str = "?") -> list[dict[str, tuple[int, int]]]:
    """[{ext: (offset, size)}] per sample of a DALI webdataset index (v1.1 without names, v1.2 with).

    The one reader of the format this module writes (prep's verify and the loaders both use it);
    raises ValueError on anything malformed."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("v1."):
        raise ValueError(f"{path}: not a DALI webdataset index (first line {lines[:1]})")
    version, count = lines[0].split()[:2]
    per = 4 if version >= "v1.2" else 3
    out = []
    for ln in lines[1:]:
        parts = ln.split()
        if not parts:
            continue
        if len(parts) % per:
            raise ValueError(f"{path}: malformed index line {ln[:80]!r}")
        out.append({parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), per)})
    if len(out) != int(count):
        raise ValueError(f"{path}: index says {count} samples but lists {len(out)}")
    return out


def read_index(idx_path: Path) -> list[dict[str, tuple[int, int]]]:
    """parse_index of an .idx file."""
    return parse_index(Path(idx_path).read_text(), idx_path)
