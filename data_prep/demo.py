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
"""
from __future__ import annotations

import colorsys
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..fileio import commit, remove_stale_tmp, tmp_name, write_json_atomic
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
    tmp = tmp_name(path)
    img.save(tmp, format="JPEG", quality=quality)
    commit(tmp, path)


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


def make_demo_dataset(out, *, num_classes: int = MAX_CLASSES, train_per_class: int = 300, val_per_class: int = 50,
                      seed: int = 0, min_side: int = 200, max_side: int = 500, grayscale_every: int = 53,
                      progress: bool = False, workers: int | None = None) -> Path:
    """Write the synthetic demo tree under `out` (see the module docstring) and return `out`.

    Deterministic in all arguments; reruns skip finished files, and a complete tree with the same
    settings is recognised by its marker and left untouched.
    """
    out = Path(out)
    if min_side < 16 or max_side < min_side:
        raise ValueError(f"need 16 <= min_side <= max_side, got {min_side}, {max_side}")
    settings = dict(num_classes=num_classes, train_per_class=train_per_class, val_per_class=val_per_class,
                    seed=seed, min_side=min_side, max_side=max_side, grayscale_every=grayscale_every)
    marker = out / _MARKER
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == settings:
                return out
        except (OSError, ValueError):
            pass
    classes = demo_classes(num_classes)
    jobs = []
    for split, per_class, split_id in (("train", train_per_class, 0), ("val", val_per_class, 1)):
        for label, (wnid, shape, texture) in enumerate(classes):
            (out / split / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                jobs.append((split, split_id, label, wnid, shape, texture, i))

    remove_stale_tmp(out)  # left by a killed run
    todo = [(n, job) for n, job in enumerate(jobs)
            if not (out / job[0] / job[3] / _file_name(job)).exists()]
    args = [(str(out), seed, num_classes, min_side, max_side, grayscale_every, n, job) for n, job in todo]
    workers = max(1, min(default_workers(workers), len(args) // 64 or 1))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="demo images", unit="img")
    if workers == 1:
        for a in args:
            _render_one(a)
            if bar is not None:
                bar.update(1)
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_one, args, chunksize=16):
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    write_json_atomic(marker, settings)
    return out
