"""OUT/manifest.json, the contract between fastvit-prep (writes it) and fastvit.data (reads it).

    m = read(OUT)                       # parsed and validated, or ManifestError with one line
    m = read(OUT, checksums=True)       # also requires the per-file digests ("files") verify needs
    write(OUT, m)                       # atomic: the file is the old one or the complete new one
    m = load(OUT)                       # parsed only (prep's resume check compares it with its settings)

Paths in a manifest are relative to OUT. Label i is classes[i]. Each split is
{"count": int, "ffcv": {res: rel .beton}, "dali": {res: {"tars": [rel], "index": [rel]}}, ...}.
"""
from __future__ import annotations

import json
from pathlib import Path

from .fileio import write_json_atomic

MANIFEST = "manifest.json"
VERSION = 1                # what fastvit-prep writes
SUPPORTED_VERSIONS = (1,)  # what the readers accept
SOURCE_KEY = "src"         # the source JPEG tree prep read (absolute, or relative to OUT)


class ManifestError(ValueError):
    """The manifest is missing, unreadable or breaks the contract; the message is one line."""


def path_of(out) -> Path:
    return Path(out) / MANIFEST


def load(out) -> dict:
    """The parsed JSON of OUT/manifest.json, not validated."""
    root = Path(out)
    path = root / MANIFEST
    if not root.is_dir():
        raise ManifestError(f"{root} is not a directory (expected a fastvit-prep output)")
    if not path.is_file():
        raise ManifestError(f"{path} not found: run fastvit-prep --src SRC --out {root} first")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: cannot read manifest ({e})") from None


def _check(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise ManifestError(f"{path}: bad manifest: {what}")


def validate(m, out, *, checksums: bool = False) -> None:
    """Check the structure of manifest `m` of OUT and that every file it names exists under OUT.
    checksums=True: it must also hold "files" {rel: {"bytes", "sha256"}} (what verify re-hashes)."""
    root = Path(out)
    path = root / MANIFEST
    _check(isinstance(m, dict), path, "not a JSON object")
    _check(m.get("version") in SUPPORTED_VERSIONS, path, f"version {m.get('version')!r} (supported: {SUPPORTED_VERSIONS})")
    classes = m.get("classes")
    _check(isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes), path, "'classes' must be a non-empty list of names")
    res = m.get("resolutions")
    _check(isinstance(res, list) and res and all(isinstance(r, int) and r > 0 for r in res), path, "'resolutions' must be positive integers")
    splits = m.get("splits")
    _check(isinstance(splits, dict) and splits, path, "'splits' is missing or empty")
    for name, s in splits.items():
        _check(isinstance(s, dict) and isinstance(s.get("count"), int) and s["count"] >= 0, path, f"split {name!r} needs an integer 'count'")
        for r, rel in (s.get("ffcv") or {}).items():
            _check((root / rel).is_file(), path, f"missing file {rel}")
        for r, entry in (s.get("dali") or {}).items():
            _check(isinstance(entry, dict) and len(entry.get("tars", [])) == len(entry.get("index", [])) and entry.get("tars"),
                   path, f"split {name!r} dali {r}: 'tars' and 'index' must be lists of equal length")
            for rel in entry["tars"] + entry["index"]:
                _check((root / rel).is_file(), path, f"missing file {rel}")
    if checksums:
        files = m.get("files")
        _check(isinstance(files, dict) and all(isinstance(d, dict) and isinstance(d.get("bytes"), int)
                                               and isinstance(d.get("sha256"), str) for d in files.values()),
               path, "'files' must map each file to its 'bytes' and 'sha256'")


def read(out, *, checksums: bool = False) -> dict:
    """load + validate: the manifest of OUT, or ManifestError with one line."""
    m = load(out)
    validate(m, out, checksums=checksums)
    return m


def source_tree(m: dict, out) -> Path | None:
    """The source JPEG tree the manifest records (the torchvision backend reads it), or None."""
    src = m.get(SOURCE_KEY)
    if not isinstance(src, str):
        return None
    return Path(src) if Path(src).is_absolute() else Path(out) / src


def write(out, manifest: dict) -> Path:
    """Write OUT/manifest.json atomically (tmp name + fsync + rename); returns its path."""
    path = path_of(out)
    write_json_atomic(path, manifest)
    return path
