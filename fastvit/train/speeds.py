"""Training speed on a machine you are not on: `fastvit-train --dry-run --assume-speed FILE`.

The one owner of that file's format. Two kinds of FILE are read:

1. A speed table (YAML or JSON), e.g. the published ViT-S/16 figure for an H100:

       device: NVIDIA H100 80GB HBM3
       cores: 16                                  # host CPU cores (the loaders' share)
       memory_gb: 80                              # GPU memory (do resident shards fit?)
       compile_s_per_shape: 60                    # optional: cold compile of one stage shape
       source: "where the numbers come from"
       points:                                    # measured training images/s (forward + backward)
         - {model: vit_small_plain, class_token: true, res: 224, keep: 1.0, img_s: 8003}

   `model` is a fastvit variant (fastvit.models.list_models) and any other key a ViTConfig override
   (depth, embed_dim, class_token, ...), so the point's FLOPs per image are known.
2. A bench/throughput.py or gpu-check JSON: its `*/fastvit_local_tflops@RES,keepK` metrics (achieved
   TFLOP/s of our model at that shape) and `machine`.

Every point is kept as an *achieved FLOP rate* (images/s × training FLOPs per image). The speed of any
other shape -- another width or depth, resolution or keep rate -- is the rate of the nearest point
(same resolution first, then the nearest one, then the nearest keep) divided by that shape's FLOPs
per image. That is an assumption, and the dry run says so on every line it prints: small shapes and
low resolutions run below the rate of large ones on a GPU (launch and memory bound), so the estimate
is optimistic for them.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TrainError

_METRIC = re.compile(r"^(?:[^/]+/)?fastvit_local_tflops@(\d+),keep([0-9.]+)$")


@dataclass(frozen=True)
class RatePoint:
    res: int
    keep: float
    flops_per_s: float        # achieved training FLOP/s at this shape
    label: str                # what it was measured as (for the printout)


@dataclass
class AssumedSpeeds:
    device: str
    source: str
    path: str
    cores: int | None = None
    memory_gb: float | None = None      # the GPU's memory (resident shards' fit)
    compile_s_per_shape: float | None = None
    points: list[RatePoint] = field(default_factory=list)

    def rate(self, res: int, keep: float) -> RatePoint:
        """The point whose FLOP rate stands for (res, keep): same resolution first, then the nearest."""
        return min(self.points, key=lambda p: (abs(math.log(p.res / res)), abs(p.keep - keep)))

    def img_s(self, flops_per_image: float, res: int, keep: float) -> float:
        """Assumed training images/s of a shape with `flops_per_image` at (res, keep)."""
        return self.rate(res, keep).flops_per_s / flops_per_image

    def describe(self) -> str:
        pts = "; ".join(f"{p.label} = {p.flops_per_s / 1e12:.1f} TFLOP/s" for p in self.points[:4])
        more = f" (+{len(self.points) - 4} more)" if len(self.points) > 4 else ""
        return f"assumed speed ({self.path}): {self.device}; {pts}{more}; source: {self.source}"


def read_assumed(path) -> AssumedSpeeds:
    """An --assume-speed FILE (a speed table, or a bench/gpu-check JSON); one-line TrainError (exit 2)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise TrainError(f"--assume-speed {path}: {e.strerror or e}", 2) from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is one line
        raise TrainError(f"--assume-speed {path}: not YAML/JSON ({str(e).splitlines()[0]})", 2) from None
    if not isinstance(d, dict):
        raise TrainError(f"--assume-speed {path}: expected a mapping with 'points' or a bench JSON with 'metrics'", 2)
    got = _from_table(d, str(path)) if "points" in d else _from_bench(d, str(path)) if "metrics" in d else None
    if got is None:
        raise TrainError(f"--assume-speed {path}: expected a mapping with 'points' or a bench JSON with 'metrics'", 2)
    if not got.points:
        raise TrainError(f"--assume-speed {path}: no speed in it (a table's points, or a bench JSON's "
                         "fastvit_local_tflops metrics)", 2)
    return got


def _from_table(d: dict, path: str) -> AssumedSpeeds:
    from fastvit.models import model_config
    from fastvit.models.vit import train_flops

    points = []
    for i, pt in enumerate(d.get("points") or []):
        pt = dict(pt) if isinstance(pt, dict) else {}
        try:
            res, keep, img_s = int(pt.pop("res")), float(pt.pop("keep", 1.0)), float(pt.pop("img_s"))
            name = pt.pop("model")
            cfg = model_config(name, **pt)
        except (KeyError, TypeError, ValueError) as e:
            raise TrainError(f"--assume-speed {path}: point {i + 1}: needs model, res, img_s (and ViTConfig "
                             f"overrides): {str(e).splitlines()[0]}", 2) from None
        if img_s <= 0 or res <= 0:
            raise TrainError(f"--assume-speed {path}: point {i + 1}: res and img_s must be positive", 2)
        extra = "".join(f" {k}={v}" for k, v in sorted(pt.items()))
        points.append(RatePoint(res, keep, img_s * train_flops(cfg, res, keep),
                                f"{name}{extra} {img_s:g} img/s at {res} px keep {keep:g}"))
    return AssumedSpeeds(device=str(d.get("device", "unnamed device")), source=str(d.get("source", "not given")),
                         path=path, cores=d.get("cores"), memory_gb=d.get("memory_gb"),
                         compile_s_per_shape=d.get("compile_s_per_shape"), points=points)


def _from_bench(d: dict, path: str) -> AssumedSpeeds:
    points = []
    for k, v in (d.get("metrics") or {}).items():
        m = _METRIC.match(k)
        if m and isinstance(v, (int, float)) and v > 0:
            points.append(RatePoint(int(m.group(1)), float(m.group(2)), float(v) * 1e12, k))
    machine = d.get("machine") or {}
    device = machine.get("gpu") or f"cpu: {machine.get('cpu', '?')} ({machine.get('cores', '?')} cores)"
    return AssumedSpeeds(device=str(device), source=f"measured by bench ({path})", path=path,
                         cores=machine.get("cores"), points=points)
