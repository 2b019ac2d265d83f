"""Find the images of each split of a source tree and their labels (pure directory walking, no decoding).

Shared by fastvit-prep (what it reads) and fastvit.data (the torchvision backend reads the same list, minus
what prep skipped), so it lives outside both.

Layouts, detected per split:
  imagefolder  SRC/<split>/<class>/*.JPEG  (ImageNet after the usual val re-sort, Imagenette, any ImageFolder)
  loc_csv      SRC/val/*.JPEG, labels from LOC_val_solution.csv (Kaggle ImageNet: first token of
               PredictionString is the wnid) found in val/ or up to 4 folders above it
  wnid_prefix  a flat folder whose files are named <wnid>_*.JPEG (label = the wnid); SRC itself counts as
               the "train" split when it is such a folder (e.g. ../shared/data/imagenet-sample)
The devkit's ILSVRC2012_validation_ground_truth.txt is not supported: its ids map to wnids only through
meta.mat, which needs scipy to read. Re-sort val/ into val/<wnid>/ (or use LOC_val_solution.csv).

classes = sorted class names of train (the torchvision/timm ImageNet order); label i is classes[i].
"""
from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
LOC_CSV = "LOC_val_solution.csv"
DEVKIT_GT = "ILSVRC2012_validation_ground_truth.txt"
_WNID_PREFIX = re.compile(r"^(n\d{8})_")


class LayoutError(Exception):
    """The source tree does not look like any supported layout; the message says what was expected."""


@dataclass
class SplitSource:
    name: str
    root: Path                                  # the split's folder
    layout: str                                 # imagefolder | loc_csv | wnid_prefix
    items: list[tuple[str, str]] = field(default_factory=list)  # (path relative to SRC, class name), sorted
    label_file: Path | None = None


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTS)


def _listdir(d: Path) -> list[os.DirEntry]:
    with os.scandir(d) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _imagefolder(src: Path, d: Path) -> list[tuple[str, str]]:
    items = []
    base = str(src)
    for cls in _listdir(d):
        if not cls.is_dir():
            continue
        # os.walk so nested folders inside a class (rare, but ImageFolder accepts them) are kept
        for root, dirs, files in os.walk(cls.path, followlinks=True):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            rel_root = os.path.relpath(root, base)  # once per folder: relpath per file costs ~20 us
            items.extend((f"{rel_root}/{f}", cls.name) for f in sorted(files) if _is_image(f))
    return items


def _flat_images(d: Path) -> list[str]:
    return [e.name for e in _listdir(d) if (e.is_file() or e.is_symlink()) and _is_image(e.name)]


def find_loc_csv(val_dir: Path, levels: int = 4) -> Path | None:
    """LOC_val_solution.csv in val/ or up to `levels` folders above it (Kaggle's sits 4 above
    ILSVRC/Data/CLS-LOC/val)."""
    d = val_dir.resolve()
    for _ in range(levels + 1):
        if (d / LOC_CSV).is_file():
            return d / LOC_CSV
        if d.parent == d:
            return None
        d = d.parent
    return None


def read_loc_csv(path: Path) -> dict[str, str]:
    """{image id: wnid} from LOC_val_solution.csv (ImageId, PredictionString = 'wnid x y x y wnid ...')."""
    out = {}
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if not header or header[:2] != ["ImageId", "PredictionString"]:
            raise LayoutError(f"{path}: expected the header 'ImageId,PredictionString'")
        for row in rows:
            if len(row) >= 2 and row[1].split():
                out[row[0]] = row[1].split()[0]
    return out


def _flat_split(name: str, d: Path, src: Path) -> SplitSource:
    files = _flat_images(d)
    rel = lambda f: os.path.relpath(d / f, src)  # noqa: E731
    if files and all(_WNID_PREFIX.match(f) for f in files):
        return SplitSource(name, d, "wnid_prefix", [(rel(f), _WNID_PREFIX.match(f).group(1)) for f in files])
    loc = find_loc_csv(d)
    if loc is not None:
        labels = read_loc_csv(loc)
        items, missing = [], []
        for f in files:
            wnid = labels.get(os.path.splitext(f)[0])
            (items.append((rel(f), wnid)) if wnid else missing.append(f))
        if missing:
            raise LayoutError(f"{loc} has no label for {len(missing)} of the {len(files)} images in {d} "
                              f"(e.g. {missing[0]})")
        return SplitSource(name, d, "loc_csv", items, label_file=loc)
    if any((x / DEVKIT_GT).is_file() for x in (d, d.parent, src, src / "devkit" / "data", d.parent / "devkit" / "data")):
        raise LayoutError(f"{d} is flat with devkit ground truth only; fastvit-prep cannot read meta.mat "
                          f"(needs scipy): re-sort it into {d}/<wnid>/ or put {LOC_CSV} beside it")
    raise LayoutError(f"{d} holds images but no class folders, no {LOC_CSV} beside or above it, "
                      f"and names without a <wnid>_ prefix")


def find_split(src: Path, name: str) -> SplitSource:
    """The images of one split; LayoutError with one line when SRC does not provide it."""
    d = src / name
    expect = (f"expected {d}/<class>/*.JPEG, or {d}/*.JPEG with {LOC_CSV} beside or above it"
              + (f", or {src}/<wnid>_*.JPEG" if name == "train" else ""))
    if not d.is_dir():
        if name == "train" and src.is_dir() and _flat_images(src):
            return _flat_split(name, src, src)
        raise LayoutError(f"no {name} split in {src}: {expect}")
    entries = _listdir(d)
    if any(e.is_dir() for e in entries):
        items = _imagefolder(src, d)
        if not items:
            raise LayoutError(f"{d} has class folders but no images in them ({expect})")
        return SplitSource(name, d, "imagefolder", items)
    if _flat_images(d):
        return _flat_split(name, d, src)
    raise LayoutError(f"{d} holds no images: {expect}")


def find_sources(src: Path, splits: Sequence[str]) -> tuple[list[str], dict[str, SplitSource]]:
    """(classes, {split: SplitSource}); classes come from train (or the first split when train is not
    asked for and SRC has none)."""
    src = Path(src)
    if not src.is_dir():
        raise LayoutError(f"source folder {src} does not exist")
    found = {s: find_split(src, s) for s in splits}
    if "train" in found:
        ref = found["train"]
    else:
        try:
            ref = find_split(src, "train")
        except LayoutError:
            ref = found[splits[0]]
    classes = sorted({c for _, c in ref.items})
    if not classes:
        raise LayoutError(f"no classes found in {ref.root}")
    return classes, found


def sources_digest(items: Sequence[tuple[str, str]]) -> str:
    """Fingerprint of a list of (relative path, class): a changed source tree is never mistaken for the old."""
    h = hashlib.sha256()
    for rel, cls in items:
        h.update(f"{rel}\0{cls}\n".encode())
    return h.hexdigest()
