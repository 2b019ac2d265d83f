"""FFCV .beton files from JPEG bytes we already encoded, in FFCV's own on-disk format (version 2).

FFCV's `RGBImageField.encode` takes pixels and JPEG-encodes them itself, which would encode every image a
second time (with OpenCV, giving bytes different from the DALI shards). The format is simple, so we
write it directly instead: two stock fields, `image` (RGBImageField, type id 2, every sample in 'jpg'
mode) and `label` (IntField, type id 1). Stock FFCV readers and decoders (`SimpleRGBImageDecoder`,
`RandomResizedCropRGBImageDecoder`, `CenterCropRGBImageDecoder`, `IntDecoder`) read the result as if
`DatasetWriter` had written it.

Layout (what `ffcv.writer.DatasetWriter` produces):
    header (HeaderType) | field descriptors | metadata (num_samples x {image meta, label}) |
    zero padding to a page boundary | data pages (a sample never straddles two pages; each page padded
    to page_size) | allocation table (sample_id, ptr, size) -- header.alloc_table_ptr points here
Because every size is known before writing, the file is produced front to back in one pass (and
hashed as it goes). The format's dtypes, and the one reader (`BetonFile`), live in fastvit/containers.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..containers import (ALLOC_TABLE_TYPE, FIELD_DESC_TYPE, FORMAT_VERSION, HEADER_TYPE, MODE_JPG, TYPE_ID_INT,
                          TYPE_ID_RGB, metadata_type)
from ..fileio import HashingWriter

MIN_PAGE_SIZE = 1 << 21  # ffcv.writer.MIN_PAGE_SIZE (2 MiB)
DEFAULT_PAGE_SIZE = 4 * MIN_PAGE_SIZE  # ffcv.writer.DatasetWriter's default (8 MiB)
MAX_PAGE_SIZE = 1 << 32
METADATA_TYPE = metadata_type([TYPE_ID_RGB, TYPE_ID_INT])  # fields f0 (image), f1 (label)
FIELDS = (("image", TYPE_ID_RGB), ("label", TYPE_ID_INT))
MAX_SIDE = np.iinfo(np.uint16).max  # width/height are stored as uint16


def _align(x: int, page: int) -> int:
    return x + (-x % page)


def choose_page_size(sizes: Sequence[int], default: int = DEFAULT_PAGE_SIZE) -> int:
    """FFCV's default page (8 MiB) once a file holds >= 16 pages of it; smaller (>= 2 MiB) below that, so
    small files are not mostly padding (the data region starts page-aligned and the last page is padded
    out); grown to fit the largest sample."""
    total, biggest = int(sum(sizes)), int(max(sizes, default=0))
    page = MIN_PAGE_SIZE
    while page < default and 16 * page < total:
        page *= 2
    while page < biggest:
        page *= 2
    if page >= MAX_PAGE_SIZE:
        raise ValueError(f"a sample of {biggest} bytes does not fit an FFCV page")
    return page


def plan_pages(sizes: Sequence[int], data_start: int, page_size: int) -> np.ndarray:
    """File offset of each sample: packed in order, a new page whenever the next one does not fit."""
    ptrs = np.empty(len(sizes), dtype=np.uint64)
    page, used = 0, 0
    for i, s in enumerate(sizes):
        if used + s > page_size:
            page, used = page + 1, 0
        ptrs[i] = data_start + page * page_size + used
        used += s
    return ptrs


def write_beton(path: Path, widths: Sequence[int], heights: Sequence[int], labels: Sequence[int],
                sizes: Sequence[int], jpegs: Iterable[bytes], page_size: int | None = None) -> dict:
    """Write an FFCV .beton of len(sizes) JPEG samples; `jpegs` yields their bytes in order.

    Returns {"bytes", "sha256", "page_size", "num_samples"}. The file appears under `path` only when
    complete (tmp name + fsync + rename).
    """
    n = len(sizes)
    if not (len(widths) == len(heights) == len(labels) == n):
        raise ValueError("widths, heights, labels and sizes must have one entry per sample")
    if n and (max(widths) > MAX_SIDE or max(heights) > MAX_SIDE):
        raise ValueError(f"FFCV stores image sides as uint16 (max {MAX_SIDE})")
    page_size = page_size or choose_page_size(sizes)
    if page_size & (page_size - 1) or page_size < MIN_PAGE_SIZE or page_size < max(sizes, default=0):
        raise ValueError(f"bad page size {page_size}")

    desc = np.zeros(len(FIELDS), dtype=FIELD_DESC_TYPE)
    for i, (name, type_id) in enumerate(FIELDS):
        desc[i]["type_id"] = type_id
        raw = np.frombuffer(name.encode("ascii"), dtype="<u1")
        desc[i]["name"][:len(raw)] = raw  # arguments stay zero: both fields' to_binary() is zeros
    metadata_start = HEADER_TYPE.itemsize + desc.nbytes
    data_start = _align(metadata_start + n * METADATA_TYPE.itemsize, page_size)
    ptrs = plan_pages(sizes, data_start, page_size)
    num_pages = 0 if n == 0 else int((int(ptrs[-1]) - data_start) // page_size) + 1
    alloc_ptr = data_start + num_pages * page_size

    header = np.zeros(1, dtype=HEADER_TYPE)
    header["version"], header["num_fields"], header["page_size"] = FORMAT_VERSION, len(FIELDS), page_size
    header["num_samples"], header["alloc_table_ptr"] = n, alloc_ptr
    meta = np.zeros(n, dtype=METADATA_TYPE)
    meta["f0"]["mode"] = MODE_JPG
    meta["f0"]["width"] = np.asarray(widths, dtype=np.uint16)
    meta["f0"]["height"] = np.asarray(heights, dtype=np.uint16)
    meta["f0"]["data_ptr"] = ptrs
    meta["f1"] = np.asarray(labels, dtype=np.int64)
    table = np.zeros(n, dtype=ALLOC_TABLE_TYPE)
    table["sample_id"] = np.arange(n, dtype=np.uint64)
    table["ptr"] = ptrs
    table["size"] = np.asarray(sizes, dtype=np.uint64)

    w = HashingWriter(Path(path))
    try:
        w.write(header.tobytes())
        w.write(desc.tobytes())
        w.write(meta.tobytes())
        w.write(bytes(data_start - w.n))
        # gather each page's samples and write the page in one go (8 MiB writes, not one per sample)
        parts: list = []
        page_base = data_start
        got = 0
        for i, data in enumerate(jpegs):
            if i >= n:
                raise ValueError("more JPEGs than planned samples")
            if len(data) != sizes[i]:
                raise ValueError(f"sample {i}: {len(data)} bytes, planned {sizes[i]}")
            ptr = int(ptrs[i])
            if ptr >= page_base + page_size:  # this sample opens the next page: pad out and flush
                used = sum(len(x) for x in parts)
                w.write(b"".join(parts))
                w.write(bytes(page_size - used))
                parts, page_base = [], page_base + page_size
            parts.append(data)
            got += 1
        if got != n:
            raise ValueError(f"got {got} JPEGs for {n} planned samples")
        if n:
            used = sum(len(x) for x in parts)
            w.write(b"".join(parts))
            w.write(bytes(page_size - used))
        assert w.n == alloc_ptr, (w.n, alloc_ptr)
        w.write(table.tobytes())
        digest = w.commit()
    except BaseException:
        w.abort()
        raise
    return {**digest, "page_size": page_size, "num_samples": n}
