"""`prep_dataset`: an ImageNet-style JPEG tree -> FFCV .beton + DALI webdataset shards, several sizes, one pass.

For each split the sorted source list is cut into shards of `shard_size` source images (by position in
the list, so shard boundaries do not depend on which images turn out bad). Worker processes decode each
image once and return one JPEG per resolution (codec.transcode); the main process receives them in
order and appends them to that shard's tars, one per resolution. A finished shard is recorded in
OUT/.work/<split>_<shard>.json (samples, sizes, offsets, checksums); that record is the unit of resume.
When every shard of a split is done, the .beton of each resolution is assembled from the same JPEG
bytes (read back from the tars; they are in the page cache) and the shard records are dropped once the
manifest is written. With --formats ffcv only, the tars live in OUT/.work and are deleted at the end.

Memory stays bounded: at most `4 * workers` chunks of `chunk_size` images are in flight.
Settings and errors live in options.py, the worker pool in workers.py.
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import mmap
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import codec, workers as _workers
from .beton import write_beton
from ..fileio import file_digest, remove_stale_tmp, write_json_atomic
from ..layout import LayoutError, find_sources, sources_digest
from .. import manifest as _manifest
from ..augspec import DEFAULT_AUG
from ..manifest import MANIFEST
from .options import FORMATS, PREP_FORMAT, WORK, PrepError, PrepOptions, TooManyBadImages, settings_fingerprint
from .wds import ShardWriter, sample_key
from ..sysinfo import default_workers
from .workers import ordered_map, transcode_chunk


# ---------------------------------------------------------------------------------------------------
# One split

@dataclass
class _Ctx:
    src: Path
    out: Path
    opts: PrepOptions
    classes: list
    bar: object


def _rel(out: Path, p: Path) -> str:
    return os.path.relpath(p, out)


def _shard_paths(ctx: _Ctx, split: str, k: int) -> dict[int, tuple[Path, Path]]:
    base = ctx.out / ("dali" if "dali" in ctx.opts.formats else f"{WORK}/tars")
    return {r: (base / f"{split}_{r}_{k:06d}.tar", base / f"{split}_{r}_{k:06d}.idx") for r in ctx.opts.resolutions}


def _record_path(ctx: _Ctx, split: str, k: int) -> Path:
    return ctx.out / WORK / f"{split}_{k:06d}.json"


def _load_done_record(ctx: _Ctx, split: str, k: int, start: int, stop: int, items: list) -> dict | None:
    """A finished shard's record, if it covers the same sources and its files all carry their checksums."""
    p = _record_path(ctx, split, k)
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("start") != start or rec.get("stop") != stop or rec.get("sources") != sources_digest(items[start:stop]):
        return None
    for rel, digest in rec.get("files", {}).items():
        f = ctx.out / rel
        if not f.is_file() or f.stat().st_size != digest["bytes"] or file_digest(f) != digest:
            return None
    return rec


def _tasks(ctx: _Ctx, items: list, labels: list, keys: list, todo: list[tuple[int, int, int]]):
    """Chunks of (src_index, absolute path, key, label) of the shards still to do, in order."""
    o = ctx.opts
    src = str(ctx.src)
    for _, start, stop in todo:
        chunk = []
        for i in range(start, stop):
            if labels[i] is None:
                continue
            chunk.append((i, os.path.join(src, items[i][0]), keys[i], labels[i]))
            if len(chunk) == o.chunk_size:
                yield (chunk, o.resolutions, o.size_ratio, o.quality, o.use_turbojpeg, o.passthrough)
                chunk = []
        if chunk:
            yield (chunk, o.resolutions, o.size_ratio, o.quality, o.use_turbojpeg, o.passthrough)


def _write_shards(ctx: _Ctx, split: str, items: list, labels: list, todo: list[tuple[int, int, int]]) -> None:
    """Transcode the source images of the shards in `todo` and write their tars + records."""
    o = ctx.opts
    keys = [sample_key(i, os.path.splitext(os.path.basename(rel))[0]) for i, (rel, _) in enumerate(items)]
    workers = max(1, min(default_workers(o.workers), math.ceil(sum(stop - start for _, start, stop in todo) / o.chunk_size)))
    results = ordered_map(transcode_chunk, _tasks(ctx, items, labels, keys, todo), workers, window=4 * workers)
    pending = deque(todo)
    cur = None  # the shard being written: dict with writers, samples, skipped, next expected index

    def open_shard(k, start, stop):
        paths = _shard_paths(ctx, split, k)
        return {"k": k, "start": start, "stop": stop, "paths": paths, "writers": {}, "samples": [],
                "skipped": [[items[i][0], f"class {items[i][1]!r} is not among train's classes"]
                            for i in range(start, stop) if labels[i] is None]}

    def finish(sh):
        files = {}
        for r, w in sh["writers"].items():
            tar_d, idx_d = w.close()
            files[_rel(ctx.out, sh["paths"][r][0])] = tar_d
            files[_rel(ctx.out, sh["paths"][r][1])] = idx_d
        rec = {"shard": sh["k"], "start": sh["start"], "stop": sh["stop"],
               "sources": sources_digest(items[sh["start"]:sh["stop"]]), "samples": sh["samples"],
               "skipped": sh["skipped"], "files": files,
               "tars": {str(r): [_rel(ctx.out, p[0]), _rel(ctx.out, p[1])] for r, p in sh["paths"].items()
                        if r in sh["writers"]}}
        write_json_atomic(_record_path(ctx, split, sh["k"]), rec, compact=True)

    def advance(upto):
        """Finish every open/pending shard that ends at or before `upto` (source index)."""
        nonlocal cur
        while True:
            if cur is None:
                if not pending or pending[0][1] > upto:
                    return
                cur = open_shard(*pending.popleft())
            if cur["stop"] <= upto:
                finish(cur)
                cur = None
            else:
                return

    try:
        for chunk in results:
            for idx, orig, outs in chunk:
                advance(idx)
                if cur is None or not (cur["start"] <= idx < cur["stop"]):
                    raise RuntimeError(f"result for source {idx} outside the open shard")  # a bug, not bad input
                if orig is None:
                    cur["skipped"].append([items[idx][0], outs])
                else:
                    key = keys[idx]
                    per_res = []
                    for r, (w, h, jpeg_len, cls_len, blob, kept) in zip(o.resolutions, outs):
                        wr = cur["writers"].get(r)
                        if wr is None:
                            wr = cur["writers"][r] = ShardWriter(*cur["paths"][r])
                        off, size = wr.add_blob(key, blob, jpeg_len, cls_len)
                        per_res.append([w, h, off, size, int(kept)])
                    cur["samples"].append([idx, labels[idx], orig[0], orig[1], per_res])
                if ctx.bar is not None:
                    ctx.bar.update(1)
                if idx + 1 == cur["stop"]:
                    advance(idx + 1)  # publish the shard now, not when the next result arrives
        advance(math.inf)
    except BaseException:
        if cur is not None:
            for w in cur["writers"].values():
                w.abort()
        raise
    finally:
        results.close()  # stops the worker pool now, not whenever the generator is collected


def _assemble_beton(ctx: _Ctx, split: str, records: list[dict], ri: int, r: int) -> tuple[str, dict]:
    """ffcv/{split}_{r}.beton from the JPEG bytes already in the shard tars (same bytes as DALI's)."""
    samples = [(rec, s) for rec in records for s in rec["samples"]]
    widths = [s[4][ri][0] for _, s in samples]
    heights = [s[4][ri][1] for _, s in samples]
    sizes = [s[4][ri][3] for _, s in samples]
    labels = [s[1] for _, s in samples]

    def jpegs():
        for rec in records:
            if not rec["samples"]:
                continue
            tar = ctx.out / rec["tars"][str(r)][0]
            with open(tar, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                for s in rec["samples"]:
                    _, _, off, size = s[4][ri][:4]
                    yield mm[off:off + size]  # a bytes copy: pages may mix samples of two tars

    path = ctx.out / "ffcv" / f"{split}_{r}.beton"
    d = write_beton(path, widths, heights, labels, sizes, jpegs(), page_size=ctx.opts.page_size)
    return _rel(ctx.out, path), {"bytes": d["bytes"], "sha256": d["sha256"]}


def _split_stats(records: list[dict], resolutions: Sequence[int]) -> dict:
    out = {}
    for ri, r in enumerate(resolutions):
        ws = [s[4][ri][0] for rec in records for s in rec["samples"]]
        hs = [s[4][ri][1] for rec in records for s in rec["samples"]]
        nb = [s[4][ri][3] for rec in records for s in rec["samples"]]
        if not ws:
            out[str(r)] = {"jpeg_bytes": 0}
            continue
        shorts = [min(w, h) for w, h in zip(ws, hs)]
        kept = sum(s[4][ri][4] for rec in records for s in rec["samples"])
        out[str(r)] = {"jpeg_bytes": int(sum(nb)), "mean_jpeg_bytes": round(sum(nb) / len(nb), 1),
                       "source_bytes_kept": int(kept),
                       "mean_width": round(sum(ws) / len(ws), 1), "mean_height": round(sum(hs) / len(hs), 1),
                       "min_short_side": int(min(shorts)), "max_short_side": int(max(shorts)),
                       "max_long_side": int(max(max(w, h) for w, h in zip(ws, hs)))}
    return out


def _run_split(ctx: _Ctx, split: str, source) -> tuple[dict, dict]:
    """Prep one split; returns (manifest split entry, {relative file: digest})."""
    o = ctx.opts
    items = source.items
    index = {c: i for i, c in enumerate(ctx.classes)}
    labels = [index.get(c) for _, c in items]
    n = len(items)
    shards = [(k, k * o.shard_size, min(n, (k + 1) * o.shard_size)) for k in range(math.ceil(n / o.shard_size))]
    records: dict[int, dict] = {}
    todo = []
    for k, start, stop in shards:
        rec = _load_done_record(ctx, split, k, start, stop, items)
        if rec is None:
            todo.append((k, start, stop))
        else:
            records[k] = rec
            if ctx.bar is not None:
                ctx.bar.update(sum(1 for i in range(start, stop) if labels[i] is not None))
    if todo:
        _write_shards(ctx, split, items, labels, todo)
        for k, start, stop in todo:
            records[k] = json.loads(_record_path(ctx, split, k).read_text())
    recs = [records[k] for k, _, _ in shards]
    count = sum(len(r["samples"]) for r in recs)
    if count == 0:
        raise PrepError(f"no usable image in split {split} of {ctx.src}: all {n} were skipped "
                        f"(first: {recs[0]['skipped'][0][0]}: {recs[0]['skipped'][0][1]})" if n else
                        f"split {split} of {ctx.src} has no images", exit_code=1)
    files: dict[str, dict] = {}
    entry: dict = {"count": count, "inputs": n, "layout": source.layout, "sources_sha256": sources_digest(items)}
    if source.label_file is not None:
        entry["label_file"] = str(source.label_file)
    if "ffcv" in o.formats:
        entry["ffcv"] = {}
        for ri, r in enumerate(o.resolutions):
            rel, d = _assemble_beton(ctx, split, recs, ri, r)
            entry["ffcv"][str(r)] = rel
            files[rel] = d
    if "dali" in o.formats:
        entry["dali"] = {}
        for r in o.resolutions:
            tars = [rec["tars"][str(r)] for rec in recs if str(r) in rec["tars"]]
            entry["dali"][str(r)] = {"tars": [t for t, _ in tars], "index": [i for _, i in tars],
                                     "samples": [len(rec["samples"]) for rec in recs if str(r) in rec["tars"]]}
            for t, i in tars:
                files[t], files[i] = _recs_file(recs, t), _recs_file(recs, i)
    entry["skipped"] = [{"path": p, "reason": why} for rec in recs for p, why in rec["skipped"]]
    entry["images"] = _split_stats(recs, o.resolutions)
    return entry, files


def _recs_file(recs: list[dict], rel: str) -> dict:
    for rec in recs:
        if rel in rec["files"]:
            return rec["files"][rel]
    raise KeyError(rel)


# ---------------------------------------------------------------------------------------------------
# The run

def _lock(out: Path) -> int:
    """An exclusive lock on OUT itself (no lock file left behind); refuses a second concurrent run."""
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise PrepError(f"another fastvit-prep is writing {out}", exit_code=1) from None
    _workers.LOCK_FD = fd  # forked workers close their copy (see workers.worker_init)
    return fd


def _unlock(fd: int) -> None:
    _workers.LOCK_FD = None
    os.close(fd)


def _clear_outputs(out: Path) -> None:
    """Remove what fastvit-prep writes in OUT (and nothing else)."""
    (out / MANIFEST).unlink(missing_ok=True)
    for d in ("ffcv", "dali", WORK):
        if (out / d).exists():
            shutil.rmtree(out / d)


def _diff(a: dict, b: dict) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys)


def _check_files(out: Path, files: dict) -> list[str]:
    """Relative paths whose size or checksum differs from the record."""
    bad = []
    for rel, d in files.items():
        p = out / rel
        if not p.is_file() or p.stat().st_size != d["bytes"] or file_digest(p) != {"bytes": d["bytes"], "sha256": d["sha256"]}:
            bad.append(rel)
    return bad


def _log(opts: PrepOptions, msg: str) -> None:
    if opts.progress:
        print(f"fastvit-prep: {msg}", file=sys.stderr, flush=True)


def _bad_fraction_check(manifest: dict, opts: PrepOptions) -> None:
    inputs = sum(s["inputs"] for s in manifest["splits"].values())
    skipped = sum(len(s["skipped"]) for s in manifest["splits"].values())
    if inputs and skipped / inputs > opts.max_bad:
        first = next(s["skipped"][0] for s in manifest["splits"].values() if s["skipped"])
        raise TooManyBadImages(f"{skipped} of {inputs} inputs ({100 * skipped / inputs:.2f}%) were skipped, more "
                               f"than --max-bad {opts.max_bad:g}; e.g. {first['path']}: {first['reason']} "
                               f"(all listed in the manifest)", manifest)


def prep_dataset(src, out, resolutions, formats=FORMATS, splits=("train", "val"), quality=90, workers=None,
                 max_bad=0.001, overwrite=False, progress=True, size_ratio=DEFAULT_AUG.val_resize_ratio,
                 **options) -> dict:
    """Prepare SRC into OUT (FFCV .beton + DALI shards per split and resolution); returns the manifest.

    Raises PrepError (one-line message) for unusable arguments or sources, TooManyBadImages (with the
    written manifest attached) when more than `max_bad` of the inputs could not be decoded.
    """
    t0 = time.perf_counter()
    opts = PrepOptions.make(resolutions=resolutions, formats=formats, splits=splits, quality=quality,
                            workers=workers, max_bad=max_bad, overwrite=overwrite, progress=progress,
                            size_ratio=size_ratio, **options)
    src, out = Path(src), Path(out)
    try:
        classes, sources = find_sources(src, opts.splits)
    except LayoutError as e:
        raise PrepError(str(e)) from None
    except OSError as e:
        raise PrepError(f"cannot read {src}: {e}", exit_code=1) from None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepError(f"cannot create {out}: {e.strerror or e}") from None
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents and any(
            out.resolve() == (src / s).resolve() for s in opts.splits):
        raise PrepError(f"--out {out} must not be the source tree or one of its splits")
    lock = _lock(out)
    try:
        manifest = _prep_locked(src, out, opts, classes, sources)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise PrepError(f"disk full while writing {out}: free space and rerun the same command to resume "
                            f"(finished shards are kept)", exit_code=1) from None
        raise
    finally:
        _unlock(lock)
    _log(opts, f"done in {time.perf_counter() - t0:.1f} s: " + "; ".join(
        f"{k} {v['count']} images ({len(v['skipped'])} skipped)" for k, v in manifest["splits"].items()))
    _bad_fraction_check(manifest, opts)
    return manifest


def _prep_locked(src: Path, out: Path, opts: PrepOptions, classes: list, sources: dict) -> dict:
    fp = settings_fingerprint(opts, src)
    work = out / WORK
    state_path = work / "state.json"
    if opts.overwrite:
        _clear_outputs(out)
    done: dict = {}
    manifest_path = out / MANIFEST
    prior = None
    if manifest_path.is_file():
        try:
            prior = _manifest.load(out)
        except _manifest.ManifestError:
            raise PrepError(f"{manifest_path} is unreadable; pass --overwrite to rebuild {out}") from None
    elif state_path.is_file():
        try:
            prior = json.loads(state_path.read_text())
        except ValueError:
            prior = None  # a state file is written atomically; unreadable means someone edited it
    elif any((out / d).is_dir() and any((out / d).iterdir()) for d in ("ffcv", "dali")):
        raise PrepError(f"{out} holds ffcv/ or dali/ files that no manifest describes; pass --overwrite to replace them")
    if prior is not None:
        if prior.get("settings") != fp:
            raise PrepError(f"{out} was prepared with other settings ({_diff(prior.get('settings') or {}, fp)}); "
                            f"pass --overwrite to replace it")
        if prior.get("classes") != classes:
            raise PrepError(f"{out} was prepared with other classes; pass --overwrite to replace it")
        for split, entry in (prior.get("splits") or {}).items():
            if split in sources and entry.get("sources_sha256") != sources_digest(sources[split].items):
                raise PrepError(f"{src / split} changed since {out} was prepared ({entry.get('inputs')} -> "
                                f"{len(sources[split].items)} images or other names); pass --overwrite to redo it")
            split_files = {rel: prior["files"][rel] for rel in _split_files(entry)}
            bad = _check_files(out, split_files)
            if bad:
                _log(opts, f"{split}: {len(bad)} finished file(s) fail their checksum (e.g. {bad[0]}); redoing the split")
                for rel in split_files:
                    (out / rel).unlink(missing_ok=True)
                for rec in work.glob(f"{split}_*.json"):
                    rec.unlink()
            else:
                done[split] = (entry, split_files)
        if manifest_path.is_file() and len(done) == len(opts.splits):
            _log(opts, f"{out} is already complete and verified")
            return prior
        manifest_path.unlink(missing_ok=True)  # being rebuilt: never leave a manifest naming missing files
    work.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out)

    def save_state():
        write_json_atomic(state_path, {"settings": fp, "classes": classes,
                                       "splits": {k: e for k, (e, _) in done.items()},
                                       "files": {rel: d for _, f in done.values() for rel, d in f.items()}})

    save_state()
    todo = [s for s in opts.splits if s not in done]
    total = sum(sum(1 for _, c in sources[s].items) for s in todo)
    bar = None
    if opts.progress and total:
        from tqdm import tqdm

        class _Bar(tqdm):
            monitor_interval = 0  # no monitor thread: worker processes are forked from this one

        bar = _Bar(total=total, unit="img", desc=f"fastvit-prep {todo[0]}", smoothing=0.05, dynamic_ncols=True)
    ctx = _Ctx(src, out, opts, classes, bar)
    try:
        for split in todo:
            if bar is not None:
                bar.set_description(f"fastvit-prep {split}")
            entry, files = _run_split(ctx, split, sources[split])
            done[split] = (entry, files)
            save_state()
    finally:
        if bar is not None:
            bar.close()
    manifest = _build_manifest(src, out, opts, classes, fp, {s: done[s] for s in opts.splits})
    _manifest.write(out, manifest)
    if "dali" not in opts.formats and (work / "tars").exists():
        shutil.rmtree(work / "tars")
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _split_files(entry: dict) -> list[str]:
    rels = list((entry.get("ffcv") or {}).values())
    for d in (entry.get("dali") or {}).values():
        rels += d["tars"] + d["index"]
    return rels


def _build_manifest(src: Path, out: Path, opts: PrepOptions, classes: list, fp: dict, done: dict) -> dict:
    from fastvit import __version__

    files = {rel: d for _, f in done.values() for rel, d in sorted(f.items())}
    return {
        "version": _manifest.VERSION,
        "tool": "fastvit-prep",
        "tool_version": f"{__version__}+prep{PREP_FORMAT}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        _manifest.SOURCE_KEY: str(src.resolve()),
        "classes": classes,
        "resolutions": list(opts.resolutions),
        "formats": list(opts.formats),
        "stored_size": {"rule": "shorter side = round(res * size_ratio), never upscaled, aspect ratio kept",
                        "size_ratio": opts.size_ratio, "short_side": opts.stored_short()},
        "encode": {"codec": "jpeg", "quality": opts.quality, "subsampling": codec.SUBSAMPLING,
                   "encoder": codec.encoder_name(opts.use_turbojpeg),
                   "resize": "DCT-domain 1/2^k on decode, exact 2x box, bilinear to the largest size, "
                             "INTER_AREA cascade to the smaller ones",
                   "same_bytes_in_ffcv_and_dali": True,
                   "passthrough": ("a source no bigger than the stored size keeps its own JPEG bytes (metadata "
                                   "segments dropped) when it is a clean sequential 8-bit YCbCr JPEG; counted per "
                                   "split and resolution as images.<res>.source_bytes_kept")
                   if opts.passthrough else False},
        "ffcv": {"fields": {"image": "RGBImageField (jpg mode)", "label": "IntField"}} if "ffcv" in opts.formats else None,
        "dali": {"ext": ["jpg", "cls"], "index_format": "v1.2", "shard_size": opts.shard_size} if "dali" in opts.formats else None,
        "splits": {s: e for s, (e, _) in done.items()},
        "files": files,
        "settings": fp,
    }
