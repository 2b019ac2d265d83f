"""torchvision backend: DataLoader over the *source* JPEG tree, the baseline users run.

It reads the images fastvit-prep accepted (the source files minus the manifest's skipped list, in
prep's order, so sample i is the same image as in the .beton), never a file prep found unreadable.

Train: RandomResizedCrop(r, aug.scale, aug.ratio) + RandomHorizontalFlip(aug.flip); val:
Resize(aug.val_resize(r)) + CenterCrop(r); both end in `pil_to_tensor` (uint8, no float round trip).
The batch order comes from BatchPlan through a batch sampler, like every other backend.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ..augspec import DEFAULT_AUG, AugSpec
from ..compat import shutdown_dataloader
from .base import BatchLoader, LoaderOptions
from .dataset import DataError, log
from .order import RANK_SEED_STRIDE, BatchPlan


class _PlanBatchSampler:
    """Yields the index lists of global batches [start, end) (set before each DataLoader pass)."""

    def __init__(self, plan: BatchPlan):
        self.plan, self.start, self.end = plan, 0, 0

    def __iter__(self):
        for g in range(self.start, self.end):
            yield self.plan.batch(g).indices.tolist()

    def __len__(self):
        return self.end - self.start


def pack_samples(samples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[(path, label)] -> (utf-8 bytes of all paths (uint8), offsets (n+1,) int64, labels (n,) int64).

    Why not a list: DataLoader workers are forked, and reading a Python object writes its refcount, so
    each worker slowly copies every page of a list of (Path, int) tuples (~250 B per sample: ~0.3 GB per
    worker at ImageNet's 1.28 M images, times 16 workers). Three numpy arrays have no per-item objects
    and stay shared (~60 B per sample, once)."""
    encoded, labels = [], []
    for path, label in samples:
        encoded.append(str(path).encode())
        labels.append(label)
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    buf = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, dtype=np.uint8)
    return buf, offsets, np.asarray(labels, dtype=np.int64)


class SourceImages(torch.utils.data.Dataset):
    """The source images prep accepted (PreppedDataset.accepted_images), opened with PIL as RGB: what
    torchvision's ImageFolder would give for them, without the files prep skipped.

    A file that fails to decode anyway (changed after prep) is replaced by the next readable sample, so a
    batch keeps its shape and an hours-long run does not die on one file; each replacement is logged
    with its reason and this process's count (`unreadable`). More than MAX_REPLACED failures in a row
    mean the tree itself is gone or broken: DataError.
    """

    MAX_REPLACED = 16

    def __init__(self, root, samples, classes, transform=None):
        self.root, self.classes, self.transform = root, list(classes), transform
        self._paths, self._offsets, self.labels = pack_samples(samples)
        self.unreadable = 0

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, i: int) -> tuple[str, int]:
        """(path, label) of sample i."""
        return bytes(self._paths[self._offsets[i]:self._offsets[i + 1]]).decode(), int(self.labels[i])

    def __getitem__(self, i: int):
        from PIL import Image

        for k in range(self.MAX_REPLACED + 1):
            path, label = self.sample((i + k) % len(self))
            try:
                with Image.open(path) as im:
                    img = im.convert("RGB")  # grayscale/CMYK/palette sources -> RGB, as ImageFolder's loader
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
                self.unreadable += 1
                log.warning("%s: unreadable at read time (%s: %s), replaced by the next sample "
                            "(%d unreadable so far in this process)", path, type(e).__name__, e, self.unreadable)
                continue
            return (self.transform(img) if self.transform is not None else img), label
        raise DataError(f"{self.root}: {self.MAX_REPLACED + 1} source images in a row are unreadable "
                        f"(last: {path}); was the tree changed after fastvit-prep?")


def open_image_folder(ds, split: str, res: int, train: bool, aug: AugSpec = DEFAULT_AUG, src=None) -> SourceImages:
    """The split's accepted source images with the backend's train/val transform."""
    from torchvision.transforms import Compose, RandomHorizontalFlip, RandomResizedCrop, Resize, CenterCrop, PILToTensor

    if train:
        ops = [RandomResizedCrop(res, scale=aug.scale, ratio=aug.ratio, antialias=True), RandomHorizontalFlip(aug.flip)]
    else:
        ops = [Resize(aug.val_resize(res), antialias=True), CenterCrop(res)]
    root = ds.source_dir(split, src)
    return SourceImages(root, ds.accepted_images(split, src), ds.classes, transform=Compose(ops + [PILToTensor()]))


class TorchvisionLoader(BatchLoader):
    backend = "torchvision"

    def __init__(self, dataset, plan: BatchPlan, device: torch.device, *, workers: int, train: bool,
                 opts: LoaderOptions, seed: int, classes=None, start_batch: int = 0):
        super().__init__(plan, device, start_batch=start_batch, train=train)
        if len(plan.stages) != 1 or plan.res_fn is not None:
            raise DataError("the torchvision backend has one output size per loader: no res_schedule")
        self.dataset = dataset  # SourceImages with this plan's transform (open_image_folder)
        if classes is not None and list(dataset.classes) != list(classes):
            raise DataError(f"{dataset.root}: class folders differ from the manifest's classes")
        if len(dataset) != plan.n:
            raise DataError(f"{dataset.root}: {len(dataset)} images, the plan expects {plan.n}")
        self._sampler = _PlanBatchSampler(plan)
        on_gpu = device.type == "cuda"
        # Linux default (fork): workers start in milliseconds; forkserver/spawn would re-import torch per
        # loader, seconds per stage on a small machine.
        self._dl = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self._sampler, num_workers=workers, pin_memory=on_gpu,
            persistent_workers=workers > 0, prefetch_factor=max(1, opts.batches_ahead) if workers > 0 else None,
            generator=torch.Generator().manual_seed(seed + RANK_SEED_STRIDE * plan.rank))  # ranks crop independently
        self._dl_iter = None

    def _open_stream(self, g: int) -> Iterator:
        non_blocking = self.device.type == "cuda"
        total = self.plan.total_steps
        while total is None or g < total:
            self._sampler.start, self._sampler.end = g, self.plan.epoch_end(g)
            self._dl_iter = iter(self._dl)
            for images, labels in self._dl_iter:
                yield images.to(self.device, non_blocking=non_blocking), labels.to(self.device, non_blocking=non_blocking)
                g += 1

    def _close_stream(self) -> None:
        shutdown_dataloader(self._dl, self._dl_iter)  # workers, pin-memory thread and queue feeders, now
        self._dl_iter = self._dl = None
