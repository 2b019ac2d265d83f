"""Model shapes as short specs: "d{depth}-w{width}[-h{heads}][-m{mlp_ratio}]", e.g. "d4-w192", "d6-w384-h6-m4".

    parse_shape("d4-w192")            # {"depth": 4, "embed_dim": 192, "num_heads": 3, "mlp_ratio": 4.0}
    shape_name({"depth": 4, "embed_dim": 192, "num_heads": 3, "mlp_ratio": 4.0})   # "d4-w192"
    param_count("d4-w192", num_classes=10)                                          # 1,997,770
    candidate_family("cpu")           # the shapes `--model auto` considers on that device
    grow_label("d4-w128")             # "d4-w128+grow": the shape trained with --growth manual (`--model auto`)
    split_grow("d4-w128+grow")        # ("d4-w128", True)

A spec names the four ViTConfig fields a shape changes; everything else (locality, patch size, head) is the
model variant's. Heads default to width // 64 (at least 1: DeiT's head width), the MLP ratio to 4.
Pure: parse_shape, shape_name and candidate_family touch nothing; param_count builds the model on torch's
meta device (no memory, no init), so it counts exactly what fastvit.models builds.
"""
from __future__ import annotations

import functools
import re

_SPEC = re.compile(r"d(\d+)-w(\d+)(?:-h(\d+))?(?:-m(\d+(?:\.\d+)?))?")
DEFAULT_MLP_RATIO = 4.0
# the registered variant whose overrides give a shape: every size field is overridden, locality on
SHAPE_MODEL = "vit_tiny_local"


def default_heads(width: int) -> int:
    """DeiT's 64-wide heads: width // 64, at least 1."""
    return max(1, width // 64)


def parse_shape(spec: str) -> dict:
    """"d6-w384-h6-m4" → ViTConfig overrides {depth, embed_dim, num_heads, mlp_ratio}; a ValueError (one line)
    for anything else."""
    text = str(spec).strip()
    m = _SPEC.fullmatch(text)
    if not m:
        raise ValueError(f"shape {spec!r} is not d<depth>-w<width>[-h<heads>][-m<mlp ratio>], e.g. d4-w192 or "
                         "d6-w384-h6-m4")
    depth, width = int(m.group(1)), int(m.group(2))
    heads = int(m.group(3)) if m.group(3) else default_heads(width)
    ratio = float(m.group(4)) if m.group(4) else DEFAULT_MLP_RATIO
    if depth < 1 or width < 1 or heads < 1 or ratio <= 0:
        raise ValueError(f"shape {spec!r}: depth, width, heads and MLP ratio must be positive")
    if width % heads:
        raise ValueError(f"shape {spec!r}: {heads} heads do not divide width {width}")
    return {"depth": depth, "embed_dim": width, "num_heads": heads, "mlp_ratio": ratio}


def shape_name(overrides: dict) -> str:
    """The spec of {depth, embed_dim[, num_heads][, mlp_ratio]}: heads and ratio only where they differ from
    the defaults, so shape_name(parse_shape(s)) is the shortest spec of s."""
    depth, width = int(overrides["depth"]), int(overrides["embed_dim"])
    heads = int(overrides.get("num_heads") or default_heads(width))
    ratio = float(overrides.get("mlp_ratio") or DEFAULT_MLP_RATIO)
    name = f"d{depth}-w{width}"
    if heads != default_heads(width):
        name += f"-h{heads}"
    if ratio != DEFAULT_MLP_RATIO:
        name += f"-m{ratio:g}"
    return name


GROW = "+grow"


def grow_label(spec: str) -> str:
    """The label of a shape trained growing (--growth manual) in `--model auto`'s tables."""
    return f"{spec}{GROW}"


def split_grow(label: str) -> tuple[str, bool]:
    """"d4-w128+grow" → ("d4-w128", True); a plain spec → (spec, False)."""
    text = str(label).strip()
    return (text[:-len(GROW)], True) if text.endswith(GROW) else (text, False)


@functools.lru_cache(maxsize=256)
def _count(shape: tuple, num_classes: int, patch_size: int, local: bool) -> int:
    import torch

    from .registry import create_model

    name = SHAPE_MODEL if local else SHAPE_MODEL.replace("_local", "_plain")
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, patch_size=patch_size, **dict(shape))
    return int(sum(p.numel() for p in model.parameters()))


def param_count(spec: str, num_classes: int, patch_size: int = 16, local: bool = True) -> int:
    """Trainable parameters of the shape's model (built on the meta device: exact, nothing allocated)."""
    return _count(tuple(sorted(parse_shape(spec).items())), int(num_classes), int(patch_size), bool(local))


# The shapes `--model auto` weighs, per device. CPU: the project's Imagenette evidence is that small nets win
# minutes-long budgets (12 CPU minutes: depth 2 beat the cpu preset's depth 4 by 5 points; 16 minutes: growth
# 2 → 4 was the best row; 2 minutes: width 192 beat 128 and 320 at depth 4), so depths 1-4 around width 192,
# and width 128 / 256 at depths 2 and 4: 8 shapes, each probed for speed (the probe is part of the budget).
# CUDA: ViT-Ti to ViT-B widths (192/384/576/768, heads width // 64, MLP 4) at depths 6, 9 and 12.
_FAMILY = {
    "cpu": ["d1-w192", "d2-w192", "d3-w192", "d4-w192", "d2-w128", "d4-w128", "d2-w256", "d4-w256"],
    "cuda": [f"d{d}-w{w}" for w in (192, 384, 576, 768) for d in (6, 9, 12)],
}


def candidate_family(device: str) -> list[str]:
    """The shape specs `--model auto` considers on `device` ("cpu", "cuda" or "cuda:N")."""
    kind = str(device).split(":")[0]
    if kind not in _FAMILY:
        raise ValueError(f"no candidate shapes for device {device!r}; known: {', '.join(_FAMILY)}")
    return list(_FAMILY[kind])


__all__ = ["GROW", "SHAPE_MODEL", "candidate_family", "default_heads", "grow_label", "param_count", "parse_shape",
           "shape_name", "split_grow"]
