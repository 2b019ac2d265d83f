"""The prep output as the loaders see it: `open_dataset(OUT)` reads and checks OUT/manifest.json.

    ds = open_dataset(OUT)              # PreppedDataset, or DataError with one clear line
    ds.ffcv_path("train", 64)           # Path to ffcv/train_64.beton
    ds.dali_shard("train", 64)          # (tars, idxs) of the webdataset
    ds.stored_res(96)                   # 128 when 64/128/224 are stored (smallest >= r, else largest)

Paths in the manifest are relative to OUT. Label i is classes[i].
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .. import manifest
from ..manifest import MANIFEST

log = logging.getLogger("fastvit.data")


class DataError(Exception):
    """A dataset or loader cannot be used as asked; the message is one line for the user."""


@dataclass(frozen=True)
class PreppedDataset:
    """What a manifest promises. Built by open_dataset; immutable so loaders can share it across threads."""

    root: Path
    classes: tuple[str, ...]
    resolutions: tuple[int, ...]
    splits: dict = field(repr=False)  # the manifest's "splits" object, checked
    src: Path | None = None  # the source JPEG tree, if the manifest records it
    manifest: dict = field(repr=False, default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def count(self, split: str) -> int:
        return int(self._split(split)["count"])

    def _split(self, split: str) -> dict:
        if split not in self.splits:
            raise DataError(f"split {split!r} is not in {self.root / MANIFEST} (has {', '.join(sorted(self.splits))})")
        return self.splits[split]

    def require_split(self, split: str, res: int | None = None, fmt: str | None = None) -> int | None:
        """Check that `split` has images, and files of `fmt` ("ffcv", "dali", "any" container; None: no
        file check, e.g. a loader over the source tree) before a loader is built. Returns the stored
        resolution a loader at `res` reads (None without res or fmt). One-line DataError otherwise."""
        if split not in self.splits:
            raise DataError(f"{self.root} has no {split!r} split (the manifest lists: {', '.join(sorted(self.splits))}); "
                            f"prep it with fastvit-prep --splits train,val")
        if not self.count(split):
            raise DataError(f"{self.root}: split {split!r} has no images")
        if fmt is None:
            return None
        if fmt == "any":
            if not self.formats(split):
                raise DataError(f"{self.root}: split {split!r} has no ffcv or dali files")
            fmt = self.formats(split)[0]
        stored = self.stored_res(res if res is not None else max(self.resolutions), split, fmt)
        return stored if res is not None else None

    def formats(self, split: str) -> tuple[str, ...]:
        return tuple(f for f in ("ffcv", "dali") if self._split(split).get(f))

    def stored_res(self, res: int, split: str = "train", fmt: str | None = None) -> int:
        """The stored resolution a stage at `res` reads: the smallest >= res, else the largest."""
        avail = self.resolutions
        if fmt is not None:
            avail = tuple(sorted(int(r) for r in self._split(split).get(fmt, {})))
            if not avail:
                raise DataError(f"{self.root}: split {split!r} has no {fmt} files (prep with --formats {fmt})")
        return pick_stored_res(res, avail)

    def ffcv_path(self, split: str, stored: int) -> Path:
        entry = self._split(split).get("ffcv", {}).get(str(stored))
        if entry is None:
            raise DataError(f"{self.root}: no ffcv file for split {split!r} at {stored} px")
        return self.root / entry

    def dali_shard(self, split: str, stored: int) -> tuple[list[Path], list[Path]]:
        entry = self._split(split).get("dali", {}).get(str(stored))
        if entry is None:
            raise DataError(f"{self.root}: no dali files for split {split!r} at {stored} px")
        return [self.root / t for t in entry["tars"]], [self.root / i for i in entry["index"]]

    def source_dir(self, split: str, src: str | Path | None = None) -> Path:
        """The ImageFolder directory of `split` in the source tree (for the torchvision backend)."""
        base = Path(src) if src is not None else self.src
        if base is None:
            raise DataError(f"{self.root / MANIFEST} does not record the source JPEG tree; pass src=<the tree fastvit-prep read>")
        d = base / split
        if not d.is_dir():
            raise DataError(f"source tree {base} has no {split}/ folder")
        return d

    def accepted_images(self, split: str, src: str | Path | None = None) -> list[tuple[Path, int]]:
        """(path, label) of the source images of `split` prep accepted (see the module function)."""
        return accepted_images(self.manifest, split, self.source_dir(split, src).parent)


def accepted_images(m: dict, split: str, src: str | Path) -> list[tuple[Path, int]]:
    """(source path, label) of every image of `split` that fastvit-prep accepted, in prep's order (sample i
    of the .beton/tars is entry i): SRC's files for the split, walked as prep walks them, minus the
    manifest's `skipped` list. DataError with one line when the tree changed since prep (other names, or
    a count that differs from the manifest's)."""
    from ..layout import LayoutError, find_split, sources_digest

    entry, base = m["splits"][split], Path(src)
    try:
        items = find_split(base, split).items
    except (LayoutError, OSError) as e:
        raise DataError(f"source tree {base}: {e}") from None
    if entry.get("sources_sha256") not in (None, sources_digest(items)):
        raise DataError(f"{base / split} changed since fastvit-prep read it ({entry.get('inputs')} -> {len(items)} "
                        f"images or other names); rerun fastvit-prep")
    skipped = {s["path"] for s in entry.get("skipped", [])}
    index = {c: i for i, c in enumerate(m["classes"])}
    out = [(base / rel, index.get(c)) for rel, c in items if rel not in skipped]
    if len(out) != entry["count"] or any(label is None for _, label in out):
        raise DataError(f"{base / split}: {len(out)} images not in the manifest's skipped list, the manifest counts "
                        f"{entry['count']}; rerun fastvit-prep on this tree")
    return out


_logged_choices: set = set()


def pick_stored_res(res: int, available) -> int:
    """Smallest stored resolution >= res, else the largest (pure; the loader logs the choice once)."""
    avail = sorted(int(r) for r in available)
    if not avail:
        raise DataError("no stored resolutions")
    for r in avail:
        if r >= res:
            return r
    return avail[-1]


def log_choice_once(backend: str, split: str, res: int, stored: int) -> None:
    key = (backend, split, res, stored)
    if key not in _logged_choices:
        _logged_choices.add(key)
        how = "exact" if stored == res else ("next larger" if stored > res else "largest stored, upsampled")
        log.info("%s %s @%d px reads the %d px shard (%s)", backend, split, res, stored, how)


def open_dataset(out: str | Path) -> PreppedDataset:
    """Read and check OUT/manifest.json (fastvit.manifest); every file it names must exist."""
    root = Path(out)
    try:
        m = manifest.read(root)
    except manifest.ManifestError as e:
        raise DataError(str(e)) from None
    return PreppedDataset(root=root, classes=tuple(m["classes"]), resolutions=tuple(sorted(m["resolutions"])),
                          splits=m["splits"], src=manifest.source_tree(m, root), manifest=m)
