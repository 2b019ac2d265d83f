"""Stochastic depth as a schedule: the drop-path rate of the last block changes with training progress
while every block keeps its share of it (timm's linear per-block ramp, set when the model was built)."""
from __future__ import annotations

import torch.nn as nn


class DropPathRate:
    """`DropPathRate(model).set(rate)`: every DropPath's probability scaled so the largest one is `rate`.
    A compiled graph guards on these probabilities, so the trainer changes them only between stages."""

    def __init__(self, model: nn.Module):
        from timm.layers import DropPath

        self._mods = [(m, float(m.drop_prob)) for m in model.modules() if isinstance(m, DropPath)]
        self.max_rate = max((p for _, p in self._mods), default=0.0)

    def set(self, rate: float) -> None:
        if self.max_rate <= 0:
            return
        for m, p0 in self._mods:
            m.drop_prob = p0 * rate / self.max_rate
