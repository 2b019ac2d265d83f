"""The `fastvit-prep` console script.

    fastvit-prep --src SRC --out OUT --res 64,128,224 [--formats ffcv,dali] [--splits train,val]
                 [--quality 90] [--workers N] [--max-bad FRACTION] [--overwrite] [--size-ratio R]
                 [--shard-size N]
    fastvit-prep --verify OUT
    fastvit-prep --demo --out OUT [--res ...] [--demo-size small|full|imagenet] [--demo-scale F]

Exit status: 0 done; 2 bad arguments or unusable source (one line, no traceback); 1 too many bad
images, verification failure, disk full or another run holding OUT; 130 interrupted (rerun to resume).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..augspec import DEFAULT_AUG
from ..manifest import MANIFEST

PROG = "fastvit-prep"
DEMO_SIZES = {  # make_demo_dataset keyword arguments ("imagenet": demo.imagenet_demo_kwargs(scale))
    "full": {},
    "small": {"num_classes": 10, "train_per_class": 60, "val_per_class": 20},
    "imagenet": None,
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line + exit 2, never the usage block
        raise SystemExit(_fail(f"{message} (see {PROG} --help)", 2))


def _fail(msg: str, code: int) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return code


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"resolutions must be positive integers, got {s!r}")
    return vals


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="ImageNet-style JPEG tree -> FFCV .beton + DALI webdataset shards at "
                "several resolutions, in one pass (decode once, encode once per resolution).")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--verify", metavar="OUT", help="re-read a prepared OUT: checksums, counts, decode via FFCV and DALI")
    mode.add_argument("--demo", action="store_true", help="write the built-in synthetic demo tree to OUT/src, then prep it")
    p.add_argument("--src", help="source tree: SRC/train/<wnid>/*.JPEG, SRC/val/<wnid>/*.JPEG (or flat val + LOC_val_solution.csv)")
    p.add_argument("--out", help="output folder (manifest.json, ffcv/, dali/)")
    p.add_argument("--res", type=_int_list, default=[64, 128, 224], help="resolutions, e.g. 64,128,224 (default)")
    p.add_argument("--formats", type=_names, default=["ffcv", "dali"], help="ffcv,dali (default both)")
    p.add_argument("--splits", type=_names, default=None, help="train,val (default; --demo and flat sources: what exists)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--max-bad", type=float, default=0.001, help="fraction of inputs that may fail before the exit status "
                   "is non-zero (default 0.001)")
    p.add_argument("--overwrite", action="store_true", help="replace an OUT made with other settings")
    p.add_argument("--size-ratio", type=float, default=DEFAULT_AUG.val_resize_ratio, help="stored shorter side = round(res * R) "
                   "(default 256/224)")
    p.add_argument("--shard-size", type=int, default=5000, help="source images per webdataset shard (default 5000)")
    p.add_argument("--demo-size", choices=sorted(DEMO_SIZES), default="full", help="with --demo: 'full' (10 classes "
                   "x 300 train / 50 val, the default), 'small', or 'imagenet' (1,000 classes, ImageNet's 1,281,167 "
                   "train / 50,000 val images, 80-112 px JPEGs: ~5 GB, ~1 CPU-hour)")
    p.add_argument("--demo-scale", type=float, default=None, metavar="F", help="with --demo: write a fraction F in "
                   "(0, 1] of the demo tree, every class kept (round(F x its count), at least 1 per class)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help exits 0; our error() exits 2 after printing one line
        return int(e.code or 0)
    try:
        if args.verify:
            return _verify(args)
        return _prep(args)
    except KeyboardInterrupt:
        return _fail("interrupted; rerun the same command to resume (finished shards are kept)", 130)


def _verify(args) -> int:
    from .verify import verify_dataset

    out = Path(args.verify)
    if not out.is_dir():
        return _fail(f"--verify {out}: no such folder", 2)
    rep = verify_dataset(out)
    print(rep.summary(), file=sys.stdout if rep.ok else sys.stderr)
    for prob in rep.problems[1:]:
        print(f"  also: {prob}", file=sys.stderr)
    return 0 if rep.ok else 1


def demo_kwargs(size: str, scale: float = 1.0) -> dict:
    """make_demo_dataset keyword arguments of --demo-size SIZE --demo-scale SCALE (ValueError if out of range)."""
    from .demo import imagenet_demo_kwargs, scaled_counts

    if size == "imagenet":
        return imagenet_demo_kwargs(scale)
    kw = dict(DEMO_SIZES[size])
    if scale != 1.0:
        n = kw.get("num_classes", 10)
        kw["train_per_class"] = scaled_counts([kw.get("train_per_class", 300)] * n, scale)
        kw["val_per_class"] = scaled_counts([kw.get("val_per_class", 50)] * n, scale)
    return kw


def _prep(args) -> int:
    from .options import PrepError, TooManyBadImages
    from .prep import prep_dataset

    if not args.out:
        return _fail("--out OUT is required", 2)
    out = Path(args.out)
    splits = args.splits
    if args.demo_scale is not None and not args.demo:
        return _fail("--demo-scale needs --demo", 2)
    if args.demo:
        if args.src:
            return _fail("--demo writes its own source (OUT/src); drop --src", 2)
        try:
            kw = demo_kwargs(args.demo_size, 1.0 if args.demo_scale is None else args.demo_scale)
        except ValueError as e:
            return _fail(f"--demo-scale: {e}", 2)
        from .demo import make_demo_dataset

        src = out / "src"
        print(f"{PROG}: writing the synthetic demo tree to {src}", file=sys.stderr, flush=True)
        make_demo_dataset(src, progress=not args.no_progress, workers=args.workers, **kw)
    else:
        if not args.src:
            return _fail("--src SRC is required (or --demo, or --verify OUT)", 2)
        src = Path(args.src)
        if not src.is_dir():
            return _fail(f"--src {src}: no such folder", 2)
    if splits is None:
        # the default is train,val; a flat <wnid>_*.JPEG folder only has a train split
        splits = [s for s in ("train", "val") if (src / s).is_dir()] or ["train"]
    try:
        prep_dataset(src, out, resolutions=args.res, formats=tuple(args.formats), splits=tuple(splits),
                     quality=args.quality, workers=args.workers, max_bad=args.max_bad, overwrite=args.overwrite,
                     progress=not args.no_progress, size_ratio=args.size_ratio, shard_size=args.shard_size)
    except TooManyBadImages as e:
        return _fail(str(e), e.exit_code)
    except PrepError as e:
        return _fail(str(e), e.exit_code)
    print(f"{PROG}: wrote {out / MANIFEST}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
