"""The `--recipe baseline` model: timm's plain ViT (`vit_{size}_patch16_224`) behind our forward surface,
so the trainer, the evaluation and the benchmarks call it exactly like the locality ViT."""
from __future__ import annotations

import torch
import torch.nn as nn

from .configs import IMAGENET_MEAN_255, IMAGENET_STD_255


class TimmBaseline(nn.Module):
    """uint8 (or [0,1] float) images in, normalization here (timm expects normalized float input);
    keep_rate is ignored (all patches)."""

    def __init__(self, model: nn.Module, mean=IMAGENET_MEAN_255, std=IMAGENET_STD_255):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, keep_rate: float | None = None) -> torch.Tensor:
        x = images.float() if images.dtype == torch.uint8 else images.float() * 255.0
        return self.model((x - self.mean) / self.std)                                   # (B,C)


def create_baseline(variant: str, *, num_classes: int, img_size: int, patch_size: int = 16,
                    drop_path_rate: float = 0.0, **overrides) -> TimmBaseline:
    """timm's `vit_{size}_patch16_224` for our variant name (`vit_small_local` -> size small), from
    scratch, at `img_size`. `overrides`: timm VisionTransformer kwargs (depth, embed_dim, num_heads...)."""
    import timm

    size = variant.split("_")[1] if variant.startswith("vit_") else "small"
    m = timm.create_model(f"vit_{size}_patch16_224", pretrained=False, num_classes=num_classes, img_size=img_size,
                          patch_size=patch_size, drop_path_rate=drop_path_rate, **overrides)
    return TimmBaseline(m)
