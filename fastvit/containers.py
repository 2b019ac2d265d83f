"""The two stored containers on disk, read side, without importing FFCV or DALI.

FFCV .beton (format version 2, what `ffcv.writer.DatasetWriter` and data_prep/beton.py write):
    header (HEADER_TYPE) | field descriptors | metadata (num_samples x one entry per field) |
    data pages | allocation table (sample_id, ptr, size), at header.alloc_table_ptr
`BetonFile(path)` is the one reader: header, field names and type ids, metadata, and every sample's
stored bytes as zero-copy views of a read-only memmap. The dtypes mirror ffcv/types.py and
ffcv/fields (tests check they match).

DALI webdataset index (what DALI's `wds2idx` writes, v1.1 or v1.2): `parse_index` / `read_index`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

FORMAT_VERSION = 2  # ffcv.types.CURRENT_VERSION
HEADER_TYPE = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                        ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
ALLOC_TABLE_TYPE = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
FIELD_DESC_TYPE = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))],
                           align=True)
IMAGE_META_TYPE = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
TYPE_ID_FLOAT, TYPE_ID_INT, TYPE_ID_RGB = 0, 1, 2
MODE_JPG, MODE_RAW = 0, 1
# Metadata entry of each FFCV field type (ffcv.types.TYPE_ID_HANDLER -> Field.metadata_type).
_BYTES_META = np.dtype([("ptr", "<u8"), ("size", "<u8")])
FIELD_META_TYPES = {TYPE_ID_FLOAT: np.dtype("<f8"), TYPE_ID_INT: np.dtype("<i8"), TYPE_ID_RGB: IMAGE_META_TYPE,
                    3: _BYTES_META, 4: np.dtype("<u8"), 5: _BYTES_META, 6: np.dtype("<u8")}


def metadata_type(type_ids) -> np.dtype:
    """One sample's metadata: fields f0, f1, ... in descriptor order (ffcv.types.get_metadata_type)."""
    return np.dtype([("", FIELD_META_TYPES[t]) for t in type_ids], align=True)


class BetonFile:
    """An FFCV .beton, read without FFCV. ValueError (one line) when it is not a readable .beton.

    version, num_samples, page_size, alloc_table_ptr, fields (names), type_ids: from the header.
    metadata: structured (num_samples,) array, fields f0, f1, ... ; labels/heights/widths/modes/offsets/
    sizes: the image and label fields' columns (the first RGBImageField and IntField), loaded on use.
    data(i): sample i's stored image bytes (JPEG, or raw HWC in raw mode) as a uint8 view.
    """

    def __init__(self, path):
        self.path = Path(path)
        buf = np.memmap(str(self.path), dtype=np.uint8, mode="r") if self.path.stat().st_size else np.zeros(0, np.uint8)
        if len(buf) < HEADER_TYPE.itemsize:
            raise ValueError(f"{self.path}: too short for an FFCV header")
        h = np.frombuffer(buf, dtype=HEADER_TYPE, count=1)[0]
        self.version, nf = int(h["version"]), int(h["num_fields"])
        self.num_samples, self.page_size = int(h["num_samples"]), int(h["page_size"])
        self.alloc_table_ptr = int(h["alloc_table_ptr"])
        meta_start = HEADER_TYPE.itemsize + FIELD_DESC_TYPE.itemsize * nf
        if len(buf) < meta_start:
            raise ValueError(f"{self.path}: too short for its {nf} field descriptors")
        desc = np.frombuffer(buf, dtype=FIELD_DESC_TYPE, count=nf, offset=HEADER_TYPE.itemsize)
        self.fields = [bytes(d["name"]).split(b"\0")[0].decode("ascii", "replace") for d in desc]
        self.type_ids = [int(d["type_id"]) for d in desc]
        self._buf, self._meta_start = buf, meta_start
        self._cols: dict = {}

    @property
    def metadata(self) -> np.ndarray:
        unknown = [t for t in self.type_ids if t not in FIELD_META_TYPES]
        if unknown:
            raise ValueError(f"{self.path}: unknown FFCV field type id(s) {unknown}")
        mt = metadata_type(self.type_ids)
        if self.version != FORMAT_VERSION or self._meta_start + mt.itemsize * self.num_samples > len(self._buf):
            raise ValueError(f"{self.path}: not an FFCV format {FORMAT_VERSION} file or truncated "
                             f"(version {self.version}, {self.num_samples} samples)")
        return np.frombuffer(self._buf, dtype=mt, count=self.num_samples, offset=self._meta_start)

    @property
    def alloc_table(self) -> np.ndarray:
        if not HEADER_TYPE.itemsize <= self.alloc_table_ptr <= len(self._buf):
            raise ValueError(f"{self.path}: allocation table pointer {self.alloc_table_ptr} is outside the file")
        n = (len(self._buf) - self.alloc_table_ptr) // ALLOC_TABLE_TYPE.itemsize
        return np.frombuffer(self._buf, dtype=ALLOC_TABLE_TYPE, count=n, offset=self.alloc_table_ptr)

    def field_names(self) -> tuple[str, str]:
        """(image field name, label field name), found by type, not by name: exactly one of each."""
        img = [n for n, t in zip(self.fields, self.type_ids) if t == TYPE_ID_RGB]
        lab = [n for n, t in zip(self.fields, self.type_ids) if t == TYPE_ID_INT]
        if len(img) != 1 or len(lab) != 1:
            raise ValueError(f"{self.path}: expected one RGBImageField and one IntField, found {self.fields}")
        return img[0], lab[0]

    def _columns(self) -> dict:
        if not self._cols:
            img, lab = self.field_names()
            meta = self.metadata
            im = meta[f"f{self.fields.index(img)}"]
            table = self.alloc_table
            size_of = dict(zip(table["ptr"].astype(np.int64).tolist(), table["size"].astype(np.int64).tolist()))
            ptrs = np.asarray(im["data_ptr"], dtype=np.int64)
            try:
                sizes = np.asarray([size_of[p] for p in ptrs.tolist()], dtype=np.int64)
            except KeyError as e:
                raise ValueError(f"{self.path}: sample data at {e} is not in the allocation table") from None
            self._cols = {"labels": np.asarray(meta[f"f{self.fields.index(lab)}"], dtype=np.int64),
                          "heights": np.asarray(im["height"], dtype=np.int64),
                          "widths": np.asarray(im["width"], dtype=np.int64),
                          "modes": np.asarray(im["mode"], dtype=np.int64), "offsets": ptrs, "sizes": sizes}
        return self._cols

    labels = property(lambda self: self._columns()["labels"])
    heights = property(lambda self: self._columns()["heights"])
    widths = property(lambda self: self._columns()["widths"])
    modes = property(lambda self: self._columns()["modes"])      # MODE_JPG or MODE_RAW
    offsets = property(lambda self: self._columns()["offsets"])
    sizes = property(lambda self: self._columns()["sizes"])

    def __len__(self) -> int:
        return self.num_samples

    def data(self, i: int) -> np.ndarray:
        o, s = self.offsets[i], self.sizes[i]
        return self._buf[o:o + s]

    def head(self, n: int) -> tuple[np.ndarray, list[bytes]]:
        """Metadata and stored image bytes of the first n samples."""
        return self.metadata[:n], [bytes(self.data(i)) for i in range(min(n, self.num_samples))]

    def close(self) -> None:
        self._buf, self._cols = None, {}


def parse_index(text: str, path: Path | str = "?") -> list[dict[str, tuple[int, int]]]:
    """[{ext: (offset, size)}] per sample of a DALI webdataset index (v1.1 without names, v1.2 with).

    The one reader of the format data_prep/wds.py writes (prep's verify and the loaders both use it);
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


def read_index(idx_path) -> list[dict[str, tuple[int, int]]]:
    """parse_index of an .idx file."""
    return parse_index(Path(idx_path).read_text(), idx_path)
