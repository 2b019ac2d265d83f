"""bench section 'prep': fastvit-prep images/s next to FFCV's usual writer, same images, same workers, one run.

    ours:     prep_dataset(--res 64,128,224 --formats ffcv,dali): decode once, 3 sizes x 2 containers
    baseline: the images prep accepted, opened with PIL (as torchvision's ImageFolder) + ffcv DatasetWriter + RGBImageField(max_resolution=256,
              jpeg_quality=90) + IntField, one resolution, one .beton per split (FFCV's write_imagenet.py).
              `write_mode='jpg'` is the headline (jpeg_quality only matters when images are JPEG-encoded);
              the constructor's literal default, write_mode='raw' (uncompressed pixels), is reported too.

Metrics: prep/ours_images_per_s@64,128,224, prep/ffcv_writer_images_per_s@256 (and _raw),
prep/ours_over_ffcv_writer (and _raw), output MB per resolution and format. Each side runs `rounds`
times, alternating, on a warm page cache; the best round counts (others share these cores).
Source: ctx.src, else ../shared/data/imagenet-sample (a flat <wnid>_*.JPEG folder, wrapped as a symlinked
ImageFolder tree so both sides read the same files), else a generated demo tree.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import time
from pathlib import Path

from . import SHARED_DATA, SectionSkipped

RES = (64, 128, 224)
BASE_RES = 256
QUICK_IMAGES = 96


def _image_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in (".jpeg", ".jpg", ".png"))


def _symlink_tree(files_by_split: dict[str, list[tuple[Path, str]]], root: Path) -> Path:
    """root/<split>/<class>/<name> -> the source files (rebuilt each time: cheap, always consistent)."""
    if root.exists():
        shutil.rmtree(root)
    for split, items in files_by_split.items():
        for path, cls in items:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            os.symlink(path.resolve(), d / path.name)
    return root


def _source(ctx) -> tuple[Path, str]:
    """An ImageFolder tree (train/ and maybe val/) both writers read, and a description of it."""
    src = Path(ctx.src) if ctx.src else (SHARED_DATA / "imagenet-sample")
    if not src.is_dir():
        from fastvit.data_prep.demo import make_demo_dataset

        src = ctx.workdir("prep-demo-src")
        make_demo_dataset(src, num_classes=10, train_per_class=30 if ctx.quick else 100, val_per_class=10)
        desc = "synthetic demo tree"
    else:
        desc = str(src)
    has_splits = (src / "train").is_dir()
    if has_splits and not ctx.quick:
        return src, desc
    # flat <wnid>_*.JPEG folder, or a quick subset: wrap as a symlinked ImageFolder tree
    if has_splits:
        items = {s: [(p, c.name) for c in sorted((src / s).iterdir()) if c.is_dir() for p in _image_files(c)]
                 for s in ("train", "val") if (src / s).is_dir()}
    else:
        flat = _image_files(src)
        pat = re.compile(r"^(n\d{8})_")
        if not flat or not all(pat.match(p.name) for p in flat):
            raise SectionSkipped(f"{src}: neither an ImageFolder tree (train/<class>/) nor a flat <wnid>_*.JPEG folder")
        items = {"train": [(p, pat.match(p.name).group(1)) for p in flat]}
    if ctx.quick:
        step = max(1, sum(len(v) for v in items.values()) // QUICK_IMAGES)
        items = {s: v[::step] for s, v in items.items()}
    return _symlink_tree(items, ctx.workdir("prep-src-tree") / "tree"), desc + (" (quick subset)" if ctx.quick else "")


def _warm(tree: Path) -> int:
    """Read every source file once so neither side pays cold-disk reads; returns the image count."""
    n = 0
    for p in tree.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 20):
                    pass
            n += 1
    return n


def _run_ours(tree: Path, out: Path, splits: list[str], workers: int) -> tuple[float, dict]:
    from fastvit.data_prep import prep_dataset

    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    m = prep_dataset(tree, out, resolutions=list(RES), formats=("ffcv", "dali"), splits=tuple(splits), quality=90,
                     workers=workers, progress=False, max_bad=1.0)
    return time.perf_counter() - t0, m


def _run_ffcv_writer(tree: Path, out: Path, manifest: dict, workers: int, write_mode: str) -> tuple[float, int]:
    """FFCV's writer over the images fastvit-prep accepted (the same list the torchvision backend reads):
    given an undecodable file, its workers die and the writer waits on them forever."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from fastvit.data.backend_torchvision import SourceImages
    from fastvit.data.dataset import accepted_images

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # DatasetWriter's own tqdm bar
        for split in manifest["splits"]:
            ds = SourceImages(tree / split, accepted_images(manifest, split, tree), manifest["classes"])
            writer = DatasetWriter(str(out / f"{split}_{BASE_RES}.beton"), {
                "image": RGBImageField(write_mode=write_mode, max_resolution=BASE_RES, jpeg_quality=90),
                "label": IntField(),
            }, num_workers=workers)
            writer.from_indexed_dataset(ds, chunksize=100)
    dt = time.perf_counter() - t0
    return dt, sum(p.stat().st_size for p in out.iterdir())


def run(ctx) -> dict[str, float]:
    from fastvit.data import installed

    missing = [m for m in ("ffcv", "torchvision") if not installed(m)]  # the backends of those names
    if missing:
        raise SectionSkipped(f"the FFCV baseline needs ffcv and torchvision ({', '.join(missing)} not installed)")
    tree, desc = _source(ctx)
    splits = [s for s in ("train", "val") if (tree / s).is_dir()]
    n = _warm(tree)
    workers = max(1, int(ctx.workers))
    work = ctx.workdir("prep-out")
    rounds = 1 if ctx.quick else 2
    best = {"ours": float("inf"), "jpg": float("inf"), "raw": float("inf")}
    manifest, base_bytes = None, {}
    for _ in range(rounds):  # alternate the sides so a noisy neighbour hurts both alike
        dt, manifest = _run_ours(tree, work / "ours", splits, workers)
        best["ours"] = min(best["ours"], dt)
        for mode in ("jpg", "raw"):
            dt, nbytes = _run_ffcv_writer(tree, work / f"ffcv_{mode}", manifest, workers, mode)
            best[mode] = min(best[mode], dt)
            base_bytes[mode] = nbytes
    count = sum(s["count"] for s in manifest["splits"].values())  # both sides write these; rates are per written image
    if count != n:
        print(f"  note: {n - count} of {n} images were skipped by fastvit-prep (listed in its manifest); "
              f"FFCV's writer is given the {count} others")
    print(f"  source: {desc}; {n} images, {workers} workers, best of {rounds}")
    ours_ips = count / best["ours"]
    res_tag = ",".join(map(str, RES))
    metrics = {
        f"prep/ours_images_per_s@{res_tag}": ours_ips,
        f"prep/ffcv_writer_images_per_s@{BASE_RES}": count / best["jpg"],
        f"prep/ffcv_writer_raw_images_per_s@{BASE_RES}": count / best["raw"],
        "prep/ours_over_ffcv_writer": ours_ips / (count / best["jpg"]),
        "prep/ours_over_ffcv_writer_raw": ours_ips / (count / best["raw"]),
        f"prep/ffcv_writer_mb@{BASE_RES}": base_bytes["jpg"] / 1e6,
        f"prep/ffcv_writer_raw_mb@{BASE_RES}": base_bytes["raw"] / 1e6,
    }
    files = manifest["files"]
    for r in RES:
        ffcv_b = sum(files[s["ffcv"][str(r)]]["bytes"] for s in manifest["splits"].values())
        dali_b = sum(files[t]["bytes"] for s in manifest["splits"].values() for t in s["dali"][str(r)]["tars"])
        jpeg_b = sum(s["images"][str(r)]["jpeg_bytes"] for s in manifest["splits"].values())
        metrics[f"prep/ours_ffcv_mb@{r}"] = ffcv_b / 1e6
        metrics[f"prep/ours_dali_mb@{r}"] = dali_b / 1e6
        metrics[f"prep/ours_jpeg_kb_per_image@{r}"] = jpeg_b / max(1, count) / 1e3
    return metrics
