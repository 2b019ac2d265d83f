"""Augmentation and regularization strength as a pure function of the planned epochs.

A ViT-S trained for 24 hours on an H100 sees on the order of 500 ImageNet epochs, one trained for an hour
about 20: they need different augmentation ("How to train your ViT?", AugReg, arXiv 2106.10270: the
amount of augmentation and regularization that pays grows with the compute; little data seen, little
augmentation). This module turns the planned epochs into the settings that carry that strength:

    strength_for_epochs(20)    # {'randaug': (0.0, 16.7...), 'mixup': 0.2, 'mix_prob': (0.0, 0.56...), ...}
    make_config("gpu", {**flags, **strength_for_epochs(epochs)})

The anchor is the published ImageNet-1k ViT-S/16 recipe that reaches 80% top-1 in 300 epochs and 76.5%
in 90 (google-research/big_vision, big_vision/configs/vit_s16_i1k.py at 642c086e68b5e49ec8c48cead8b1c6fb042fc85a,
arXiv 2205.01580): RandAugment randaug(2,10) and mixup with Beta concentration p = 0.2 on every batch,
no cutmix, no dropout or stochastic depth. Its strength is reached at 90 epochs and kept beyond (the
same settings served 90 and 300 epochs; nothing published here says more pays for ViT-S); below it
the strength falls linearly in log(epochs) to none at 3 epochs, where the project's CPU recipe trains
with augmentation off (recipes/cpu.yaml). Stochastic depth 0.1 is added only for ViT-B and larger
(embed_dim >= 768): big_vision/configs/vit_i1k.py (5f95305c) says the AugReg paper's regularization
(dropout, stochastic depth) "was shown to help with B/32, B/16, L/16 models" (its Figure 4), not S/16.

Units. big_vision's RandAugment is TensorFlow's (big_vision/pp/archive/autoaugment.py, _MAX_LEVEL = 10:
level 10 is each op's full range, e.g. 30 degrees of rotation); ours is torchvision's with 31 magnitude
bins (fastvit/train/augment.py: bin 30 is the full range), so level m is our magnitude 3m, capped at 30.
big_vision's mixup p is the Beta(p, p) concentration, i.e. our `mixup` alpha, applied to every batch
(our `mix_prob` end 1). Strengths ramp from 0 at the start of the run to these values at its end, as
every recipe here does (fastvit/train/schedules.py `aug_at`).

The planner or the dry run calls it with the epochs the plan will see; it reads nothing and writes nothing.
"""
from __future__ import annotations

import math

from fastvit.settings import ConfigError

EPOCHS_NONE = 3.0       # at or below: no augmentation (the CPU recipe's regime)
EPOCHS_FULL = 90.0      # at or above: the published ViT-S/16 recipe's strength
BV_RANDAUG_LEVEL = 10   # randaug(2,10)
BV_RANDAUG_OPS = 2
BV_MIXUP_P = 0.2
DROP_PATH_LARGE = 0.1   # AugReg's stochastic depth, for ViT-B and larger
LARGE_WIDTH = 768


def randaug_magnitude(bv_level: float) -> float:
    """big_vision / TensorFlow RandAugment level (10 = full range) -> our torchvision magnitude (30 = full)."""
    return min(3.0 * bv_level, 30.0)


def strength(epochs: float) -> float:
    """0 at <= EPOCHS_NONE epochs, 1 at >= EPOCHS_FULL, linear in log(epochs) between."""
    if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs > 0):
        raise ConfigError(f"planned epochs must be a positive number, got {epochs!r}")
    s = math.log(epochs / EPOCHS_NONE) / math.log(EPOCHS_FULL / EPOCHS_NONE)
    return min(max(s, 0.0), 1.0)


def strength_for_epochs(epochs: float, embed_dim: int = 384) -> dict:
    """The augmentation and regularization settings (TrainConfig flat keys) for a run that plans to see
    `epochs` epochs of its train split, with a model `embed_dim` wide. Pure: the same inputs, the same dict."""
    s = strength(epochs)
    large = embed_dim >= LARGE_WIDTH
    return {
        "randaug": (0.0, s * randaug_magnitude(BV_RANDAUG_LEVEL)),
        "randaug_ops": BV_RANDAUG_OPS,
        "mixup": BV_MIXUP_P,
        "cutmix": 0.0,
        "mix_prob": (0.0, s),
        "drop_path": (0.0, s * DROP_PATH_LARGE if large else 0.0),
    }
