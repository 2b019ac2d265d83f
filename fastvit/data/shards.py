"""Random access to the encoded samples of a shard, without decoding: JPEG bytes and labels by index.

`WdsShard` reads webdataset tars through their DALI `.idx` files (`v1.2 N`, then per sample
`ext offset size name ...`) over a read-only mmap, so a batch's JPEGs are zero-copy views.
`open_beton` does the same for an FFCV .beton (its metadata holds labels and image sizes).
Sample i is the i-th sample of the shard in stored order (the same in both formats when prep writes
both from one list).
"""
from __future__ import annotations

import mmap
from pathlib import Path
from typing import Sequence

import numpy as np

from ..containers import BetonFile, parse_index
from .dataset import DataError


def parse_wds_index(text: str, path: Path | str = "?") -> list[dict[str, tuple[int, int]]]:
    """[{ext: (offset, size)}] per sample from a DALI webdataset index; DataError when malformed."""
    try:
        return parse_index(text, path)
    except ValueError as e:
        raise DataError(str(e)) from None


class WdsShard:
    """All tars of one (split, res) webdataset; JPEG views and int64 labels by global sample index."""

    def __init__(self, tars: Sequence[Path], idxs: Sequence[Path], img_ext: str = "jpg", cls_ext: str = "cls"):
        self._files, self._maps, offs, sizes, tar_of = [], [], [], [], []
        labels = []
        for t, (tar, idx) in enumerate(zip(tars, idxs)):
            entries = parse_wds_index(Path(idx).read_text(), idx)
            f = open(tar, "rb")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._files.append(f)
            self._maps.append(mm)
            buf = np.frombuffer(mm, dtype=np.uint8)
            for e in entries:
                if img_ext not in e or cls_ext not in e:
                    raise DataError(f"{idx}: a sample lacks .{img_ext} or .{cls_ext}")
                o, s = e[img_ext]
                offs.append(o)
                sizes.append(s)
                tar_of.append(t)
                co, cs = e[cls_ext]
                labels.append(int(bytes(buf[co:co + cs]).decode("ascii").strip()))
        self._bufs = [np.frombuffer(mm, dtype=np.uint8) for mm in self._maps]
        self.offsets = np.asarray(offs, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.tar_of = np.asarray(tar_of, dtype=np.int32)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def jpeg(self, i: int) -> np.ndarray:
        o, s = self.offsets[i], self.sizes[i]
        return self._bufs[self.tar_of[i]][o:o + s]

    def close(self) -> None:
        self._bufs = []
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere; the map goes when it does
                pass
        for f in self._files:
            f.close()
        self._maps, self._files = [], []


def open_beton(path, columns: bool = True) -> BetonFile:
    """The .beton at `path` (fastvit.containers.BetonFile: labels, image sizes and stored bytes by sample
    index, no FFCV import), with its image and label fields checked; DataError when unreadable.
    columns=True also reads the per-sample columns now (one pass over metadata and allocation table)."""
    try:
        b = BetonFile(path)
        b.field_names()
        if columns:
            b.offsets  # noqa: B018 -- so a bad file fails here, with one line
    except (OSError, ValueError) as e:
        raise DataError(str(e)) from None
    return b
