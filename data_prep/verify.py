"""`fastvit-prep --verify OUT`: re-read everything a prep run wrote and say whether it is intact.

Checks, per file named by the manifest: it exists with the recorded size and sha256. Per split and
resolution: the .beton header (version, fields, sample count) and the DALI indexes (sample counts, every
sample has .jpg and .cls inside its tar) agree with the manifest's count; then the first `samples`
images are decoded through a stock FFCV `Loader` (CenterCropRGBImageDecoder + IntDecoder, run uncompiled
so no numba compile is paid) and through a DALI CPU pipeline (`fn.readers.webdataset` +
`fn.decoders.image`), and the two must give the same labels, the JPEG bytes must be identical in both
containers, and the decoded sizes must match the sizes FFCV's metadata records.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import manifest
from ..augspec import DEFAULT_AUG
from ..containers import TYPE_ID_INT, TYPE_ID_RGB, BetonFile, read_index
from ..fileio import file_digest


@dataclass
class VerifyReport:
    out: str
    ok: bool = True
    problems: list = field(default_factory=list)
    files_checked: int = 0
    bytes_checked: int = 0
    decoded: dict = field(default_factory=dict)  # "split/res/format" -> samples decoded

    def fail(self, msg: str) -> None:
        self.ok = False
        self.problems.append(msg)

    def summary(self) -> str:
        if self.ok:
            n = sum(self.decoded.values())
            return (f"{self.out}: OK ({self.files_checked} files, {self.bytes_checked / 2**20:.1f} MiB checksummed, "
                    f"{n} samples decoded through FFCV and DALI)")
        more = f" (+{len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"{self.out}: FAILED: {self.problems[0]}{more}"


def decode_with_ffcv(path: Path, n: int, res: int) -> tuple[np.ndarray, np.ndarray]:
    """First n samples through a stock FFCV Loader: ((n, res, res, 3) uint8, (n,) labels)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline.compiler import Compiler

    was = Compiler.is_enabled
    Compiler.set_enabled(False)  # a handful of samples: the numba compile (~40 s) would dominate
    try:
        loader = Loader(str(path), batch_size=n, num_workers=1, order=OrderOption.SEQUENTIAL,
                        indices=list(range(n)), drop_last=False, os_cache=True,
                        pipelines={"image": [CenterCropRGBImageDecoder((res, res), ratio=DEFAULT_AUG.val_crop)],
                                   "label": [IntDecoder()]})
        images, labels = [], []
        for im, lab in loader:
            images.append(np.asarray(im))
            labels.append(np.asarray(lab).reshape(-1))
        return np.concatenate(images), np.concatenate(labels)
    finally:
        Compiler.set_enabled(was)


def decode_with_dali(tars: list[Path], idxs: list[Path], n: int) -> tuple[list[np.ndarray], np.ndarray, list[bytes]]:
    """First n samples through a DALI CPU pipeline: (decoded HWC images, labels, raw JPEG bytes)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=n, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=[str(t) for t in tars], index_paths=[str(i) for i in idxs],
                                         ext=["jpg", "cls"], random_shuffle=False, name="reader",
                                         missing_component_behavior="error")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls, jpg

    p = pipe()
    p.build()
    images, cls, raw = p.run()
    labels = np.array([int(bytes(np.asarray(cls[i])).decode("ascii")) for i in range(n)], dtype=np.int64)
    return ([np.asarray(images[i]) for i in range(n)], labels,
            [bytes(np.asarray(raw[i])) for i in range(n)])


def verify_dataset(out, samples: int = 16, decode: bool = True) -> VerifyReport:
    """Re-read every file of a prepared OUT; report.ok only if everything matches the manifest."""
    out = Path(out)
    rep = VerifyReport(str(out))
    try:
        m = manifest.read(out, checksums=True)
    except manifest.ManifestError as e:
        rep.fail(str(e))
        return rep
    for rel, d in m["files"].items():
        p = out / rel
        if not p.is_file():
            rep.fail(f"{rel} is missing")
            continue
        got = file_digest(p)
        rep.files_checked += 1
        rep.bytes_checked += got["bytes"]
        if got["bytes"] != d["bytes"]:
            rep.fail(f"{rel}: {got['bytes']} bytes, manifest says {d['bytes']}")
        elif got["sha256"] != d["sha256"]:
            rep.fail(f"{rel}: checksum mismatch (file changed or corrupted)")
    num_classes = len(m["classes"])
    for split, s in m["splits"].items():
        count = s["count"]
        for r in m["resolutions"]:
            _check_split_res(out, rep, split, s, str(r), int(r), count, num_classes, samples if decode else 0)
    return rep


def _check_split_res(out: Path, rep: VerifyReport, split: str, s: dict, rk: str, r: int, count: int,
                     num_classes: int, samples: int) -> None:
    where = f"{split} @{r}"
    beton = s.get("ffcv", {}).get(rk)
    dali = s.get("dali", {}).get(rk)
    if beton is None and dali is None:
        rep.fail(f"{where}: no files in the manifest")
        return
    n = min(samples, count)
    ff = None
    if beton is not None:
        path = out / beton
        try:
            h = BetonFile(path)
        except (OSError, ValueError) as e:
            rep.fail(f"{beton}: unreadable header ({e})")
            return
        if h.num_samples != count:
            rep.fail(f"{beton}: {h.num_samples} samples, manifest says {count}")
        if h.type_ids != [TYPE_ID_RGB, TYPE_ID_INT] or h.fields != ["image", "label"]:
            rep.fail(f"{beton}: fields {h.fields} {h.type_ids}, expected image (RGBImageField) + label (IntField)")
        if rep.ok and n:
            try:
                meta, blobs = h.head(n)
                images, labels = decode_with_ffcv(path, n, r)
            except Exception as e:  # report, never crash: verify must say what is wrong
                rep.fail(f"{beton}: FFCV cannot read it ({type(e).__name__}: {e})")
                return
            if images.shape != (n, r, r, 3) or images.dtype != np.uint8:
                rep.fail(f"{beton}: FFCV decoded {images.shape} {images.dtype}, expected ({n}, {r}, {r}, 3) uint8")
            if not np.array_equal(labels, meta["f1"]) or labels.min() < 0 or labels.max() >= num_classes:
                rep.fail(f"{beton}: labels out of range or not those in the metadata")
            ff = (meta, blobs, labels)
            rep.decoded[f"{split}/{r}/ffcv"] = n
    if dali is not None:
        tars, idxs = [out / t for t in dali["tars"]], [out / i for i in dali["index"]]
        total = 0
        for t, i in zip(tars, idxs):
            try:
                entries = read_index(i)
            except (OSError, ValueError) as e:
                rep.fail(f"{i.relative_to(out)}: {e}")
                return
            size = t.stat().st_size if t.is_file() else 0
            for e in entries:
                if "jpg" not in e or "cls" not in e or any(o + z > size for o, z in e.values()):
                    rep.fail(f"{i.relative_to(out)}: a sample lacks .jpg/.cls or points past the end of its tar")
                    return
            total += len(entries)
        if total != count:
            rep.fail(f"{where}: DALI indexes list {total} samples, manifest says {count}")
        if rep.ok and n:
            try:
                images, labels, raw = decode_with_dali(tars, idxs, n)
            except Exception as e:
                rep.fail(f"{where}: DALI cannot read the shards ({type(e).__name__}: {e})")
                return
            if labels.min() < 0 or labels.max() >= num_classes:
                rep.fail(f"{where}: DALI labels out of range")
            rep.decoded[f"{split}/{r}/dali"] = n
            if ff is not None:
                meta, blobs, ff_labels = ff
                if not np.array_equal(labels, ff_labels):
                    rep.fail(f"{where}: FFCV and DALI labels differ for the first {n} samples")
                if blobs != raw:
                    rep.fail(f"{where}: FFCV and DALI hold different JPEG bytes for the first {n} samples")
                sizes = [(int(x["f0"]["height"]), int(x["f0"]["width"])) for x in meta]
                if [im.shape[:2] for im in images] != sizes:
                    rep.fail(f"{where}: decoded sizes differ from the sizes FFCV's metadata records")
