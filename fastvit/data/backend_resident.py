"""GPU-resident backend: decode a shard once into device memory, augment there in batched torch ops.

At 32-64 px a ViT eats images faster than any JPEG decoder, but a whole ImageNet shard at 64 px is
~15 GB of uint8 (and 3.9 GB at 32 px): it fits in an H100. Decoding once and cropping on the GPU takes
the decoder out of the loop for those stages.

Storage: every image at its stored size, HWC uint8, packed end to end in one flat tensor (no padding
whatever the aspect ratio) with per-image offset, height, width.

Per batch (all batched, no per-sample kernel launches):
  boxes (B,4) = RandomResizedCrop parameters (torchvision's rule: 10 tries, then a center crop with
  the ratio clamped), drawn with numpy from a generator seeded by (stage seed, epoch, batch), so a
  resumed run repeats the uninterrupted run's crops exactly; flip (B,) bool.
  bilinear sampling (align_corners=False, like F.interpolate) = 4 gathers from the flat tensor.
Val: the center crop AugSpec.val_crop (224/256) of the shorter side, resized to r (FFCV's
CenterCropRGBImageDecoder). Crop parameters: fastvit.augspec.AugSpec, handed in by build_loader.

Works on CPU tensors too (the tests), where "device memory" means host RAM.

Under torchrun every rank decodes the whole shard (the epochs' orders reshuffle which samples a rank
reads) and crops its rows of each global batch with the global batch's crop parameters.
"""
from __future__ import annotations

import io
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..augspec import DEFAULT_AUG, AugSpec
from .base import BatchLoader, LoaderOptions
from .dataset import DataError, PreppedDataset
from .order import BatchPlan

# ---------------------------------------------------------------------------------------------- crops


def random_resized_boxes(h: np.ndarray, w: np.ndarray, rng: np.random.Generator, scale=DEFAULT_AUG.scale,
                         ratio=DEFAULT_AUG.ratio, tries: int = AugSpec.attempts) -> np.ndarray:
    """(B,4) int64 [top, left, height, width] per image of size (h, w): torchvision's RandomResizedCrop."""
    b = len(h)
    area = (h * w).astype(np.float64)[:, None]                                    # (B,1)
    target = area * rng.uniform(scale[0], scale[1], size=(b, tries))              # (B,T)
    log_r = np.log(ratio)
    aspect = np.exp(rng.uniform(log_r[0], log_r[1], size=(b, tries)))
    cw = np.round(np.sqrt(target * aspect)).astype(np.int64)
    ch = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (cw > 0) & (ch > 0) & (cw <= w[:, None]) & (ch <= h[:, None])
    first = np.argmax(ok, axis=1)                                                 # first accepted try
    found = ok[np.arange(b), first]
    bw, bh = cw[np.arange(b), first], ch[np.arange(b), first]
    # Fallback (no try fits): the whole image, cropped to the nearest allowed aspect ratio, centered.
    in_ratio = w / h
    fw = np.where(in_ratio < ratio[0], w, np.where(in_ratio > ratio[1], np.round(h * ratio[1]), w)).astype(np.int64)
    fh = np.where(in_ratio < ratio[0], np.round(w / ratio[0]), h).astype(np.int64)
    bw, bh = np.where(found, bw, fw), np.where(found, bh, fh)
    u = rng.uniform(size=(b, 2))
    top = np.where(found, np.floor(u[:, 0] * (h - bh + 1)), (h - bh) // 2).astype(np.int64)
    left = np.where(found, np.floor(u[:, 1] * (w - bw + 1)), (w - bw) // 2).astype(np.int64)
    return np.stack([top, left, bh, bw], axis=1)


def center_boxes(h: np.ndarray, w: np.ndarray, ratio: float = DEFAULT_AUG.val_crop) -> np.ndarray:
    """(B,4) [top, left, c, c]: the centered square of side ratio * min(h, w) (FFCV's center crop)."""
    c = np.maximum(1, (ratio * np.minimum(h, w)).astype(np.int64))
    return np.stack([(h - c) // 2, (w - c) // 2, c, c], axis=1)


def crop_resize_flat(data: torch.Tensor, offsets: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor,
                     boxes: torch.Tensor, flip: torch.Tensor, res: int) -> torch.Tensor:
    """Bilinear crop+resize of packed HWC uint8 images -> (B,3,res,res) uint8 contiguous.

    data (total,) uint8; offsets/heights/widths (B,) int64 of the batch's images; boxes (B,4) float
    [top, left, h, w] in pixels; flip (B,) bool. Sample centers follow align_corners=False.
    """
    dev = data.device
    top, left, bh, bw = boxes.unbind(1)                                           # (B,)
    p = torch.arange(res, device=dev, dtype=torch.float32) + 0.5                  # (r,)
    ys = top[:, None] + p[None] * (bh / res)[:, None] - 0.5                       # (B,r)
    xs = left[:, None] + p[None] * (bw / res)[:, None] - 0.5                      # (B,r)
    xs = torch.where(flip[:, None], xs.flip(1), xs)
    hmax = (heights - 1).to(torch.float32)[:, None]
    wmax = (widths - 1).to(torch.float32)[:, None]
    ys = torch.minimum(ys.clamp_min(0), hmax)
    xs = torch.minimum(xs.clamp_min(0), wmax)
    y0, x0 = ys.floor(), xs.floor()
    wy, wx = ys - y0, xs - x0                                                     # (B,r)
    y0, x0 = y0.long(), x0.long()
    y1 = torch.minimum(y0 + 1, heights[:, None] - 1)
    x1 = torch.minimum(x0 + 1, widths[:, None] - 1)
    row = widths[:, None] * 3                                                     # (B,1) bytes per row
    base = offsets[:, None, None]                                                 # (B,1,1)
    c = torch.arange(3, device=dev)                                               # (3,)

    def at(yy, xx):  # (B,r),(B,r) -> (B,r,r,3) float
        idx = base + (yy * row)[:, :, None] + (xx * 3)[:, None, :]                # (B,r,r)
        return data[idx[..., None] + c].to(torch.float32)

    top_row = at(y0, x0) * (1 - wx)[:, None, :, None] + at(y0, x1) * wx[:, None, :, None]
    bot_row = at(y1, x0) * (1 - wx)[:, None, :, None] + at(y1, x1) * wx[:, None, :, None]
    out = top_row * (1 - wy)[:, :, None, None] + bot_row * wy[:, :, None, None]   # (B,r,r,3)
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------- storage


@dataclass(eq=False)   # hashable by identity: the live-shard registry holds weak references
class ResidentShard:
    data: torch.Tensor     # (total,) uint8, images HWC packed
    offsets: torch.Tensor  # (N,) int64
    heights: torch.Tensor  # (N,) int64
    widths: torch.Tensor   # (N,) int64
    labels: torch.Tensor   # (N,) int64
    np_heights: np.ndarray
    np_widths: np.ndarray


def _jpeg_size(buf: np.ndarray) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(buf.tobytes())) as im:  # header only
        return im.height, im.width


class ResidentTooLarge(DataError):
    """A shard that does not fit the resident memory cap (the curriculum loader streams it instead)."""


_LIVE: "weakref.WeakSet[ResidentShard]" = weakref.WeakSet()   # decoded shards alive in this process


def resident_bytes(device: torch.device) -> int:
    """Bytes of decoded shards alive in this process on `device` (the current and the next stage's)."""
    return sum(s.data.numel() for s in list(_LIVE) if s.data.device == device)


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of host memory: psutil when installed, else /proc/meminfo, else sysconf."""
    try:
        import psutil
    except ImportError:                  # optional: the kernel's own figures
        try:
            info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            return int(info["MemTotal"].split()[0]) * 1024, int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            page = os.sysconf("SC_PAGE_SIZE")
            return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    vm = psutil.virtual_memory()
    return vm.total, vm.available


def memory_cap(device: torch.device, share: float) -> int:
    """The most all resident shards on `device` may hold together: `share` of its total memory."""
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
    else:
        total = host_memory()[0]
    return int(total * share)


def memory_budget(device: torch.device, share: float) -> int:
    """Bytes one more shard may take now: the cap less the shards already held (the stage that is
    training keeps its shard while the next one fills), and never more than is free."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = host_memory()[1]
    return max(0, min(memory_cap(device, share) - resident_bytes(device), int(free)))


def _encoded_source(ds: PreppedDataset, split: str, stored: int):
    """(labels, heights, widths, get(i) -> bytes view, is_raw(i)) from the .beton if any, else the tars."""
    from ..containers import MODE_RAW
    from .shards import WdsShard, open_beton

    if "ffcv" in ds.formats(split) and str(stored) in ds.splits[split].get("ffcv", {}):
        b = open_beton(ds.ffcv_path(split, stored))
        return b.labels, b.heights, b.widths, b.data, (lambda i: b.modes[i] == MODE_RAW), b
    tars, idxs = ds.dali_shard(split, stored)
    w = WdsShard(tars, idxs)
    hw = np.array([_jpeg_size(w.jpeg(i)) for i in range(len(w))], dtype=np.int64).reshape(-1, 2)
    return w.labels, hw[:, 0], hw[:, 1], w.jpeg, (lambda i: False), w


def estimate_bytes(ds: PreppedDataset, split: str, stored: int) -> int:
    """Decoded size of a shard: from the manifest's mean stored size when it has one, else exact from
    .beton metadata, else from 256 JPEG headers."""
    from .shards import WdsShard, open_beton

    stats = (ds.splits[split].get("images") or {}).get(str(stored)) or {}
    if stats.get("mean_width") and stats.get("mean_height"):
        return int(3 * stats["mean_width"] * stats["mean_height"] * ds.count(split) * 1.02)  # 2%: mean of products

    if str(stored) in ds.splits[split].get("ffcv", {}):
        b = open_beton(ds.ffcv_path(split, stored))
        return int((3 * b.heights * b.widths).sum())
    w = WdsShard(*ds.dali_shard(split, stored))
    pick = np.linspace(0, len(w) - 1, num=min(256, len(w))).astype(np.int64)
    mean = float(np.mean([3 * np.prod(_jpeg_size(w.jpeg(i))) for i in pick]))
    w.close()
    return int(mean * ds.count(split))


def decode_shard(ds: PreppedDataset, split: str, stored: int, device: torch.device, *, share: float = 0.5,
                 workers: int = 1, chunk: int = 512) -> ResidentShard:
    """Decode every image of the (split, stored) shard once into one packed uint8 tensor on `device`."""
    labels, h, w, get, is_raw, src = _encoded_source(ds, split, stored)
    try:
        n = len(labels)
        sizes = 3 * h * w
        total = int(sizes.sum())
        budget = memory_budget(device, share)
        if total > budget:
            raise ResidentTooLarge(f"{split} @{stored} px decodes to {total / 2**30:.2f} GiB, more than the "
                                   f"{budget / 2**30:.2f} GiB left of the {share:.0%} {device.type} memory cap")
        offsets = np.zeros(n, dtype=np.int64)
        offsets[1:] = np.cumsum(sizes)[:-1]
        data = torch.empty(total, dtype=torch.uint8, device=device)

        def put(i: int, img: torch.Tensor) -> None:  # img (3,H,W) uint8 or raw HWC bytes
            if img.dim() == 3:
                if img.shape[1:] != (h[i], w[i]):
                    raise DataError(f"{split} @{stored} sample {i}: decoded {tuple(img.shape[1:])}, metadata ({h[i]}, {w[i]})")
                img = img.permute(1, 2, 0)
            data[offsets[i]:offsets[i] + sizes[i]].copy_(img.reshape(-1), non_blocking=True)

        def cpu_decode(i: int) -> torch.Tensor:  # PIL: torchvision's CPU decode_jpeg is deprecated
            if is_raw(i):
                return torch.from_numpy(np.array(get(i)))
            from PIL import Image

            with Image.open(io.BytesIO(get(i).tobytes())) as im:
                return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)

        if device.type == "cuda":
            for s in range(0, n, chunk):
                ids = list(range(s, min(s + chunk, n)))
                jpg = [i for i in ids if not is_raw(i)]
                if jpg:  # nvJPEG batched decode, straight into device memory
                    from torchvision.io import ImageReadMode, decode_jpeg

                    outs = decode_jpeg([torch.from_numpy(np.array(get(i))) for i in jpg], mode=ImageReadMode.RGB,
                                       device=device)
                    for i, img in zip(jpg, outs):
                        put(i, img)
                for i in ids:
                    if is_raw(i):
                        put(i, torch.from_numpy(np.array(get(i))))
            torch.cuda.current_stream(device).synchronize()
        else:
            with ThreadPoolExecutor(max(1, workers)) as pool:
                for i, img in enumerate(pool.map(cpu_decode, range(n), chunksize=64)):
                    put(i, img)
    finally:
        src.close()
    as_t = lambda a: torch.from_numpy(np.array(a, dtype=np.int64)).to(device)  # noqa: E731
    shard = ResidentShard(data=data, offsets=as_t(offsets), heights=as_t(h), widths=as_t(w), labels=as_t(labels),
                          np_heights=np.asarray(h), np_widths=np.asarray(w))
    _LIVE.add(shard)
    return shard


# ---------------------------------------------------------------------------------------------- loader


class ResidentLoader(BatchLoader):
    backend = "gpu_resident"

    def __init__(self, ds: PreppedDataset, split: str, stored: int, plan: BatchPlan, device: torch.device, *,
                 workers: int, train: bool, opts: LoaderOptions, start_batch: int = 0,
                 shard: ResidentShard | None = None, aug: AugSpec = DEFAULT_AUG):
        super().__init__(plan, device, start_batch=start_batch, train=train)
        self.aug = aug
        self.shard = shard if shard is not None else decode_shard(ds, split, stored, device,
                                                                  share=opts.gpu_mem_share, workers=workers)
        if len(self.shard.labels) != plan.n:
            raise DataError(f"{split} @{stored}: {len(self.shard.labels)} images decoded, the plan expects {plan.n}")

    def make_batch(self, g: int):
        spec = self.plan.batch(g)
        idx_np = spec.indices
        h, w = self.shard.np_heights[idx_np], self.shard.np_widths[idx_np]
        if self.train:
            boxes, flip = self._random_crops(g, spec)
        else:
            boxes, flip = center_boxes(h, w, self.aug.val_crop), np.zeros(len(idx_np), dtype=bool)
        dev = self.device
        # One small host->device copy per batch, from pinned memory (a copy from pageable memory may wait
        # for the stream: a host sync per batch): (B,6) float64 = index, box (top, left, h, w), flip.
        packed = np.empty((len(idx_np), 6), dtype=np.float64)
        packed[:, 0], packed[:, 1:5], packed[:, 5] = idx_np, boxes, flip
        host = torch.from_numpy(packed)
        if dev.type == "cuda":
            host = host.pin_memory()
        t = host.to(dev, non_blocking=True)
        idx = t[:, 0].long()                                                       # exact: < 2**53
        s = self.shard
        images = crop_resize_flat(s.data, s.offsets[idx], s.heights[idx], s.widths[idx], t[:, 1:5].float(),
                                  t[:, 5] > 0.5, spec.res)
        return images, s.labels[idx]

    def _random_crops(self, g: int, spec):
        """Crop boxes and flips of batch g, drawn for the whole global batch and this rank's rows taken
        (BatchPlan's every world-th sample), so w ranks crop exactly as one process would."""
        plan = self.plan
        full = plan if plan.world == 1 else self._global_plan()
        idx = full.batch(g).indices
        h, w = self.shard.np_heights[idx], self.shard.np_widths[idx]
        rng = np.random.default_rng([plan.seeds[spec.stage], spec.epoch, spec.index_in_epoch])
        boxes = random_resized_boxes(h, w, rng, self.aug.scale, self.aug.ratio, self.aug.attempts)
        flip = rng.uniform(size=len(idx)) < self.aug.flip
        return boxes[plan.rank::plan.world], flip[plan.rank::plan.world]

    def _global_plan(self) -> BatchPlan:
        p = self.plan
        return BatchPlan(p.n, p.stages, p.seeds, endless=p.endless, drop_last=p.drop_last, shuffle=p.shuffle,
                         res_fn=p.res_fn)

    def _open_stream(self, g: int) -> Iterator:
        total = self.plan.total_steps
        while total is None or g < total:
            yield self.make_batch(g)
            g += 1

    def _close_stream(self) -> None:
        self.shard = None
