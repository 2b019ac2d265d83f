"""The built-in demo dataset: a synthetic, deterministic, ImageNet-layout JPEG tree.

    make_demo_dataset(out)  ->  out/train/<wnid>/*.JPEG, out/val/<wnid>/*.JPEG

It is SYNTHETIC (procedurally drawn shapes and textures), not ImageNet: it exists so that every part of
fastvit (prep, loaders, kernels, training) can be run end to end in minutes on a CPU, with a task a
small ViT learns well above chance. Each class is a (shape, texture) pair; colour leans towards a class
hue but overlaps heavily between classes, objects vary in size, position and rotation, and every image
has a noisy gradient background with distractor shapes, so no single pixel gives the class away.
Image sides are 200-500 px with ImageNet-like aspect ratios, and a few images are grayscale.

Generation is deterministic in (seed, class, split, index), so two runs write identical files, and it
resumes: finished files are kept, each file is written under a temporary name and then renamed, and a
marker records the settings of a complete tree.

The ImageNet-shaped variant (`imagenet_demo_kwargs(scale)`, `fastvit-prep --demo --demo-size imagenet
[--demo-scale F]`) has 1,000 classes with sorted ImageNet-like wnids, ImageNet's split sizes (train
1,281,167 images, 732-1,300 per class; val 50 per class) and small images (sides 80-112 px, ~4 KB), so
the full tree is ~5 GB and about one CPU-hour to draw: it exists to measure how prep, loaders,
ordering, sharding and evaluation scale with n, not to train on.
"""
from __future__ import annotations

import colorsys
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..fileio import remove_stale_tmp, tmp_name, write_json_atomic
from ..sysinfo import default_workers

SHAPES = ("disc", "square", "triangle", "star", "ring")
TEXTURES = ("stripes", "dots")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)
_MARKER = ".demo-complete.json"


def demo_classes(num_classes: int = MAX_CLASSES) -> list[tuple[str, str, str]]:
    """[(wnid, shape, texture)] in label order (wnids sort in this order, as ImageNet's do)."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
    out = []
    for i in range(num_classes):
        shape, texture = SHAPES[i % len(SHAPES)], TEXTURES[(i // len(SHAPES)) % len(TEXTURES)]
        out.append((f"n9{i:07d}", shape, texture))
    return out


IMAGENET_CLASSES = 1000
IMAGENET_TRAIN = 1_281_167
IMAGENET_TRAIN_MIN, IMAGENET_TRAIN_MAX = 732, 1300
IMAGENET_VAL_PER_CLASS = 50
IMAGENET_SIDES = (80, 112)  # small JPEGs: the 32 and 64 px shards are real resizes, the tree stays ~5 GB


def imagenet_classes(num_classes: int = IMAGENET_CLASSES) -> list[tuple[str, str, str]]:
    """[(wnid, shape, texture)] of the ImageNet-shaped demo: 'n' + 8 digits like ImageNet's wnids, sorted
    (label i is the i-th), the first one ImageNet's own first wnid. Shapes and textures cycle; the class
    hue (label / num_classes) tells classes apart."""
    if not 1 <= num_classes <= 10 * IMAGENET_CLASSES:
        raise ValueError(f"num_classes must be in 1..{10 * IMAGENET_CLASSES}, got {num_classes}")
    return [(f"n{1440764 + 9973 * i:08d}", SHAPES[i % len(SHAPES)], TEXTURES[(i // len(SHAPES)) % len(TEXTURES)])
            for i in range(num_classes)]


def imagenet_train_counts() -> list[int]:
    """Train images per class of the ImageNet-shaped demo (1,000 ints, label order).

    The real per-class counts are not shipped here, so this is a documented deterministic stand-in with
    ImageNet-1k's total (1,281,167), minimum (732) and maximum (1,300): most classes hold 1,300, and 66
    classes (every 15th label from 7 on) hold counts spaced evenly from 732 up to 1,299; the remaining
    56 images come off the 56 largest of those short classes, one each."""
    counts = [IMAGENET_TRAIN_MAX] * IMAGENET_CLASSES
    short = list(range(7, IMAGENET_CLASSES, 15))[:66]
    span = IMAGENET_TRAIN_MAX - 1 - IMAGENET_TRAIN_MIN
    for k, label in enumerate(short):
        counts[label] = IMAGENET_TRAIN_MIN + round(span * k / (len(short) - 1))
    extra = sum(counts) - IMAGENET_TRAIN
    for label in sorted(short, key=lambda c: -counts[c])[:extra]:
        counts[label] -= 1
    assert sum(counts) == IMAGENET_TRAIN and min(counts) == IMAGENET_TRAIN_MIN and max(counts) == IMAGENET_TRAIN_MAX
    return counts


def scaled_counts(counts: Sequence[int], scale: float) -> list[int]:
    """round(scale x count) per class (halves round up), at least 1: every class survives any scale."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    return [max(1, int(math.floor(scale * c + 0.5))) for c in counts]


def imagenet_demo_kwargs(scale: float = 1.0) -> dict:
    """make_demo_dataset keyword arguments of the ImageNet-shaped tree, a fraction `scale` of it."""
    return {"num_classes": IMAGENET_CLASSES, "imagenet_like": True,
            "train_per_class": scaled_counts(imagenet_train_counts(), scale),
            "val_per_class": scaled_counts([IMAGENET_VAL_PER_CLASS] * IMAGENET_CLASSES, scale),
            "min_side": IMAGENET_SIDES[0], "max_side": IMAGENET_SIDES[1]}


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape (None for round shapes, drawn as ellipses)."""
    if shape == "square":
        pts = [(math.cos(angle + k * math.pi / 2 + math.pi / 4), math.sin(angle + k * math.pi / 2 + math.pi / 4)) for k in range(4)]
    elif shape == "triangle":
        pts = [(math.cos(angle + k * 2 * math.pi / 3), math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.45
            a = angle + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    else:
        return None
    return [(cx + r * x, cy + r * y) for x, y in pts]


def _shape_mask(shape: str, w: int, h: int, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(mask)
    poly = _shape_polygon(shape, cx, cy, r, angle)
    if poly is not None:
        d.polygon(poly, fill=255)
    else:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            ri = r * 0.55
            d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    return mask


def _texture(texture: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w) float in [0, 1]: the pattern that mixes the object's two colours."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(8, 18)
    if texture == "stripes":
        a = rng.uniform(0, math.pi)
        t = (np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / period) > 0).astype(np.float32)
    else:  # dots on a lattice
        phase = rng.uniform(0, period, size=2)
        dx = ((xx + phase[0]) % period) - period / 2
        dy = ((yy + phase[1]) % period) - period / 2
        t = ((dx * dx + dy * dy) < (period * 0.3) ** 2).astype(np.float32)
    return t


def _colour(hue: float, rng: np.random.Generator, sat=(0.45, 1.0), val=(0.45, 1.0)) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(*sat), rng.uniform(*val))
    return np.array([r, g, b], dtype=np.float32) * 255


def render_demo_image(shape: str, texture: str, class_hue: float, rng: np.random.Generator,
                      min_side: int = 200, max_side: int = 500) -> Image.Image:
    """One RGB image of `shape` filled with `texture`, on a cluttered noisy background."""
    short = int(rng.integers(min_side, max_side + 1))
    aspect = float(np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3))))  # ImageNet-like w/h
    w, h = (int(round(short * aspect)), short) if aspect >= 1 else (short, int(round(short / aspect)))
    w, h = min(max(w, min_side), max_side), min(max(h, min_side), max_side)

    # Background: a two-colour gradient plus noise.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * math.pi)
    g = (xx * math.cos(a) + yy * math.sin(a))
    g = (g - g.min()) / max(float(g.max() - g.min()), 1.0)
    c0, c1 = _colour(rng.random(), rng, (0.1, 0.6), (0.3, 0.9)), _colour(rng.random(), rng, (0.1, 0.6), (0.3, 0.9))
    img = c0[None, None, :] * (1 - g[..., None]) + c1[None, None, :] * g[..., None]
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")

    # Clutter: small distractor shapes of any kind, outline or solid.
    d = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 8))):
        s = SHAPES[int(rng.integers(len(SHAPES)))]
        r = rng.uniform(0.04, 0.12) * min(w, h)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        col = tuple(int(v) for v in _colour(rng.random(), rng))
        poly = _shape_polygon(s, cx, cy, r, rng.uniform(0, 2 * math.pi))
        if poly is None:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=col, width=int(rng.integers(1, 4)))
        else:
            d.polygon(poly, fill=col if rng.random() < 0.5 else None, outline=col)
    for _ in range(int(rng.integers(2, 6))):
        d.line([(rng.uniform(0, w), rng.uniform(0, h)), (rng.uniform(0, w), rng.uniform(0, h))],
               fill=tuple(int(v) for v in _colour(rng.random(), rng)), width=int(rng.integers(1, 4)))

    # The object: class shape, class texture, colour near the class hue (with wide overlap).
    r = rng.uniform(0.22, 0.4) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    mask = _shape_mask(shape, w, h, cx, cy, r, rng.uniform(0, 2 * math.pi))
    tex = _texture(texture, w, h, rng)[..., None]
    fg = _colour(class_hue + rng.normal(0, 0.12), rng)
    bg2 = _colour(rng.random(), rng, (0.0, 0.5), (0.1, 0.6))
    obj = fg[None, None, :] * tex + bg2[None, None, :] * (1 - tex)
    m = np.asarray(mask.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)[..., None] / 255
    out = np.asarray(canvas, dtype=np.float32) * (1 - m) + obj * m

    out += rng.normal(0, rng.uniform(4, 14), size=out.shape).astype(np.float32)  # sensor-like noise
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def _write_jpeg_atomic(img: Image.Image, path: Path, quality: int) -> None:
    """tmp name + rename: a killed run leaves only *.tmp-* files (removed by the rerun). No fsync: the
    tree is regenerated bit for bit from its settings, and two fsyncs per file dominated the cost of a
    million small files; the completion marker is written durably at the end."""
    tmp = tmp_name(path)
    img.save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, path)


def _file_name(job) -> str:
    split, _, _, wnid, _, _, i = job
    return f"{wnid}_{split}_{i:05d}.JPEG"


def _render_one(arg) -> None:
    out, seed, num_classes, min_side, max_side, grayscale_every, n, job = arg
    split, split_id, label, wnid, shape, texture, i = job
    rng = np.random.default_rng([seed, split_id, label, i])
    img = render_demo_image(shape, texture, label / max(num_classes, 1), rng, min_side, max_side)
    if grayscale_every and (n % grayscale_every) == grayscale_every - 1:
        img = img.convert("L")  # a few grayscale JPEGs, as in ImageNet
    _write_jpeg_atomic(img, Path(out) / split / wnid / _file_name(job), quality=int(rng.integers(75, 96)))


def _per_class(v, num_classes: int, what: str) -> list[int]:
    counts = [int(v)] * num_classes if isinstance(v, (int, np.integer)) else [int(c) for c in v]
    if len(counts) != num_classes or any(c < 0 for c in counts):
        raise ValueError(f"{what} must be a count >= 0 or one per class ({num_classes}), got {v!r:.80}")
    return counts


def _jobs(classes, train_counts, val_counts):
    """(split, split_id, label, wnid, shape, texture, i) of every image, in the one fixed order."""
    for split, counts, split_id in (("train", train_counts, 0), ("val", val_counts, 1)):
        for label, (wnid, shape, texture) in enumerate(classes):
            for i in range(counts[label]):
                yield (split, split_id, label, wnid, shape, texture, i)


def make_demo_dataset(out, *, num_classes: int = MAX_CLASSES, train_per_class: int | Sequence[int] = 300,
                      val_per_class: int | Sequence[int] = 50, seed: int = 0, min_side: int = 200,
                      max_side: int = 500, grayscale_every: int = 53, progress: bool = False,
                      workers: int | None = None, imagenet_like: bool = False) -> Path:
    """Write the synthetic demo tree under `out` (see the module docstring) and return `out`.

    train_per_class / val_per_class: one count for every class, or a list with one per class.
    imagenet_like: ImageNet-like wnids (imagenet_classes) and up to 10,000 classes instead of the
    10 shape x texture classes. Deterministic in all arguments; reruns skip finished files (one
    directory listing per class), and a complete tree with the same settings is recognised by its
    marker and left untouched. Writes on `workers` processes (default: all cores) with a progress bar
    when `progress`.
    """
    out = Path(out)
    if min_side < 16 or max_side < min_side:
        raise ValueError(f"need 16 <= min_side <= max_side, got {min_side}, {max_side}")
    classes = imagenet_classes(num_classes) if imagenet_like else demo_classes(num_classes)
    train_counts = _per_class(train_per_class, num_classes, "train_per_class")
    val_counts = _per_class(val_per_class, num_classes, "val_per_class")
    settings = dict(num_classes=num_classes, train_per_class=train_per_class, val_per_class=val_per_class,
                    seed=seed, min_side=min_side, max_side=max_side, grayscale_every=grayscale_every)
    if not isinstance(train_per_class, int) or not isinstance(val_per_class, int) or imagenet_like:
        settings.update(train_per_class=train_counts, val_per_class=val_counts, imagenet_like=bool(imagenet_like))
    marker = out / _MARKER
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == settings:
                return out
        except (OSError, ValueError):
            pass
    present = {}
    for split, counts in (("train", train_counts), ("val", val_counts)):
        for (wnid, _, _), c in zip(classes, counts):
            d = out / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            present[(split, wnid)] = set(os.listdir(d))
    remove_stale_tmp(out)  # left by a killed run
    total = sum(train_counts) + sum(val_counts)
    todo = [(n, job) for n, job in enumerate(_jobs(classes, train_counts, val_counts))
            if _file_name(job) not in present[(job[0], job[3])]]
    del present
    args = ((str(out), seed, num_classes, min_side, max_side, grayscale_every, n, job) for n, job in todo)
    workers = max(1, min(default_workers(workers), len(todo) // 64 or 1))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=total - len(todo), desc="demo images", unit="img", smoothing=0.05)
    if workers == 1:
        for a in args:
            _render_one(a)
            if bar is not None:
                bar.update(1)
    else:
        import multiprocessing as mp

        chunk = max(1, min(64, len(todo) // (workers * 8)))
        with mp.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_one, args, chunksize=chunk):
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    write_json_atomic(marker, settings)
    return out
