"""The augmentation every loader backend applies, written once: `AugSpec`.

Train: RandomResizedCrop (area share `scale`, aspect ratio `ratio`, `attempts` tries then a center
crop) resized to r, then a horizontal flip with probability `flip`.
Val: the centered square of side `val_crop` x the shorter side (224/256), resized to r; equivalently
resize the shorter side to round(r * val_resize_ratio) and center-crop r.

fastvit-prep stores each image with its shorter side round(res * val_resize_ratio) (its default
`size_ratio`), so the val crop of a stored image is exactly res pixels. No torch import here: prep
workers import this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class AugSpec:
    scale: tuple[float, float] = (0.08, 1.0)     # RandomResizedCrop: share of the image area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop: aspect ratio w/h (log-uniform)
    flip: float = 0.5                            # probability of a horizontal flip (train)
    val_crop: float = 224 / 256                  # val: center square side / shorter side
    # torchvision's RandomResizedCrop and FFCV's decoder both hard-code 10 tries; DALI and the
    # gpu_resident crops use this so all four agree.
    attempts: ClassVar[int] = 10

    def __post_init__(self):
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if not 0 <= self.flip <= 1:
            raise ValueError(f"flip is a probability, got {self.flip}")
        if not 0 < self.val_crop <= 1:
            raise ValueError(f"val_crop must be in (0, 1], got {self.val_crop}")

    @property
    def val_resize_ratio(self) -> float:
        """Shorter side before the val center crop / output side (256/224)."""
        return 1 / self.val_crop

    def val_resize(self, res: int) -> int:
        """The shorter side a val image is resized to before its center crop to res."""
        return round(res * self.val_resize_ratio)


DEFAULT_AUG = AugSpec()
