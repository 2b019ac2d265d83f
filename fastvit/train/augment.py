"""Batch augmentations on the device, on uint8 images (B,3,r,r), so the model's fused
normalize+patchify kernel still reads one byte per pixel.

- mixup / cutmix: timm's `Mixup` draws the parameters (its own RNG logic and `mix_prob`, through
  fastvit.compat.mixup_params: a private timm method) and builds the
  soft targets (`mixup_target`, with label smoothing); the pixels are mixed here because timm mixes in
  place in floating point. A mixup blend is rounded back to uint8: at most 0.5/255 off, far below the
  JPEG noise.
- RandAugment: torchvision.transforms.v2.RandAugment runs on uint8 tensors on any device, but draws
  one set of ops per call, i.e. per batch. We split the batch into `groups` chunks and draw per chunk:
  per-chunk rather than per-image randomness is the compromise that keeps it vectorized on the GPU.
"""
from __future__ import annotations

import torch
from timm.data.mixup import Mixup, cutmix_bbox_and_lam, mixup_target

from ..compat import mixup_params


def make_mixup(*, mixup: float, cutmix: float, label_smoothing: float, num_classes: int) -> Mixup:
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=0.0, label_smoothing=label_smoothing,
                 num_classes=num_classes, mode="batch")


def mix_batch(mix: Mixup, images: torch.Tensor, labels: torch.Tensor, mix_prob: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,3,r,r) uint8, (B,) int64 → mixed uint8 images, (B,C) soft targets (smoothed)."""
    mix.mix_prob = mix_prob
    lam, use_cutmix = mixup_params(mix) if (mix.mixup_alpha > 0 or mix.cutmix_alpha > 0) else (1.0, False)
    if lam != 1.0:
        if use_cutmix:
            (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(images.shape, lam, ratio_minmax=mix.cutmix_minmax,
                                                        correct_lam=mix.correct_lam)
            images = images.clone()
            images[:, :, yl:yh, xl:xh] = images.flip(0)[:, :, yl:yh, xl:xh]
        else:
            f = images.float()
            images = (f * lam + f.flip(0) * (1.0 - lam)).round_().clamp_(0, 255).to(torch.uint8)
    targets = mixup_target(labels, mix.num_classes, lam, mix.label_smoothing)          # (B,C)
    return images, targets


def randaugment_groups(images: torch.Tensor, magnitude: float, num_ops: int = 2,
                       groups: int = 8) -> torch.Tensor:
    """RandAugment with `magnitude` (0-30) on uint8 (B,3,r,r), a fresh draw of ops per chunk."""
    if magnitude <= 0:
        return images
    from torchvision.transforms import v2

    ra = v2.RandAugment(num_ops=num_ops, magnitude=int(round(min(magnitude, 30))), num_magnitude_bins=31)
    chunks = images.chunk(max(1, min(groups, images.shape[0])))
    return torch.cat([ra(c) for c in chunks], dim=0)
