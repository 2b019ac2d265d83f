"""Can the loader feed the model? The planner's feed-rate model (pure: numbers in, verdict out).

    table = load_decode_table()                       # {backend: {res: images/s per core}}
    v = feed_verdict("ffcv", 128, step_img_s=27_000, cores=16, table=table)
    v["data_bound"], v["feed_img_s"], v["note"]
    resident_bytes(1_281_167, 64)                     # raw uint8 bytes of a GPU-resident shard

The table is the `decode` bench section's output (bench/throughput.py --section decode --json FILE):
images decoded + training-cropped per CPU second with one loader worker, per backend and resolution,
measured from fastvit-prep's shards. DEFAULT_TABLE is the committed one (bench/results/scale/decode.json,
measured on the dev machine's CPU); pass another path for the machine you plan for.

The model: with `cores` cores and `trainer_cores` of them kept by the training process, the loader
runs on the other `cores - trainer_cores` and delivers per_core x workers images/s (decode scales with
workers: each decodes its own samples). A resolution between two measured ones is interpolated in
log(rate) vs log(res); beyond the measured range the nearest rate is scaled by (r0 / res)^2 (decode cost
~ pixels). The run is data-bound when that feed is below the model's step rate; it then trains at the
feed rate, or keeps the shard resident on the GPU (`resident_bytes`) where it fits.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

DEFAULT_TABLE = Path(__file__).resolve().parents[2] / "bench" / "results" / "scale" / "decode.json"
_METRIC = re.compile(r"^decode/(?P<backend>[a-z_]+?)(?:_cpu)?_images_per_core_s@(?P<res>\d+)$")


class FeedError(ValueError):
    """A decode table or a request the feed model cannot use; the message is one line."""


def parse_decode_metrics(metrics: dict) -> dict[str, dict[int, float]]:
    """{backend: {res: images/s per core}} from bench metrics `decode/<backend>[_cpu]_images_per_core_s@<res>`."""
    table: dict[str, dict[int, float]] = {}
    for name, v in metrics.items():
        m = _METRIC.match(name)
        if m and isinstance(v, (int, float)) and v > 0:
            table.setdefault(m["backend"], {})[int(m["res"])] = float(v)
    return table


def load_decode_table(path: str | Path | None = None) -> dict[str, dict[int, float]]:
    """The per-core decode table of a bench JSON ({"metrics": {...}}) or of a plain
    {backend: {res: rate}} JSON; FeedError with one line when missing or empty."""
    p = Path(path) if path is not None else DEFAULT_TABLE
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise FeedError(f"decode table {p}: cannot read ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        table = parse_decode_metrics(data["metrics"])
    elif isinstance(data, dict):
        try:
            table = {str(b): {int(r): float(v) for r, v in rates.items()} for b, rates in data.items()}
        except (AttributeError, TypeError, ValueError):
            raise FeedError(f"decode table {p}: expected {{backend: {{res: images/s per core}}}}") from None
    else:
        table = {}
    if not table or any(not rates or min(rates.values()) <= 0 for rates in table.values()):
        raise FeedError(f"decode table {p}: no positive decode/<backend>_images_per_core_s@<res> rates")
    return table


def per_core_rate(rates: dict[int, float], res: int) -> float:
    """Images/s per core at `res` from measured {res: rate}: log-log interpolation inside the measured
    range, (r0 / res)^2 scaling from the nearest measured r0 outside it."""
    if res <= 0:
        raise FeedError(f"resolution must be positive, got {res}")
    pts = sorted((int(r), float(v)) for r, v in rates.items())
    if not pts:
        raise FeedError("no measured rates")
    exact = dict(pts).get(int(res))
    if exact is not None:
        return exact
    if res <= pts[0][0] or res >= pts[-1][0]:
        r0, v0 = pts[0] if res <= pts[0][0] else pts[-1]
        return v0 * (r0 / res) ** 2
    for (r0, v0), (r1, v1) in zip(pts, pts[1:]):
        if r0 <= res <= r1:
            t = (math.log(res) - math.log(r0)) / (math.log(r1) - math.log(r0))
            return math.exp(math.log(v0) + t * (math.log(v1) - math.log(v0)))
    raise AssertionError("unreachable")


def resident_bytes(n: int, res: int) -> int:
    """Raw uint8 bytes of n images at res x res x 3: the floor of a GPU-resident shard. The resident
    path (backend_resident) keeps each image at its *stored* size (shorter side res x 256/224, aspect
    kept), so its real footprint is larger: ~1.5x at 64 px (measured on the CPU path: ~2.3 GB beyond an
    idle loader's memory for 128 k images of the 64 px shard, vs 1.57 GB from this formula;
    bench/results/scale/README.md)."""
    if n < 0 or res <= 0:
        raise FeedError(f"need n >= 0 and res > 0, got n={n}, res={res}")
    return int(n) * 3 * int(res) ** 2


def feed_verdict(backend: str, res: int, step_img_s: float, cores: int, table: dict, trainer_cores: int = 1,
                 *, n: int | None = None, gpu_free_bytes: int | None = None) -> dict:
    """Expected loader feed vs the model's step rate at one stage.

    Returns {backend, res, workers, per_core_img_s, feed_img_s, step_img_s, data_bound, expected_img_s,
    resident_bytes (None without n), resident_fits (None without gpu_free_bytes), note}.
    expected_img_s = min(feed, step): the images/s the stage trains at with this loader."""
    if backend not in table:
        raise FeedError(f"no decode rates for backend {backend!r} (the table has: {', '.join(sorted(table))})")
    if cores < 1 or trainer_cores < 0:
        raise FeedError(f"need cores >= 1 and trainer_cores >= 0, got {cores}, {trainer_cores}")
    if step_img_s <= 0:
        raise FeedError(f"step rate must be positive, got {step_img_s}")
    workers = max(1, int(cores) - int(trainer_cores))
    per_core = per_core_rate(table[backend], int(res))
    feed = per_core * workers
    bound = feed < step_img_s
    rb = resident_bytes(n, res) if n is not None else None
    fits = None if rb is None or gpu_free_bytes is None else rb <= gpu_free_bytes
    if not bound:
        note = (f"{backend} at {res} px: {workers} workers x {per_core:,.0f} img/s = {feed:,.0f} img/s "
                f">= step {step_img_s:,.0f} img/s (headroom x{feed / step_img_s:.2f})")
    else:
        note = (f"data-bound: {backend} at {res} px feeds {feed:,.0f} img/s ({workers} workers x "
                f"{per_core:,.0f}) < step {step_img_s:,.0f} img/s; expect {feed:,.0f} img/s")
        if rb is not None:
            note += f"; GPU-resident shard needs {rb / 1e9:.1f} GB"
            if fits is not None:
                note += " (fits)" if fits else " (does not fit)"
    return {"backend": backend, "res": int(res), "workers": workers, "per_core_img_s": per_core,
            "feed_img_s": feed, "step_img_s": float(step_img_s), "data_bound": bound,
            "expected_img_s": min(feed, float(step_img_s)), "resident_bytes": rb, "resident_fits": fits,
            "note": note}
