"""Model configs and the registry: a small table of named variants, one checked dataclass.

Kept apart from the architecture (vit.py) so the network reads on its own and adding a variant is one
line here, not a 150-line registration block.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fastvit.settings import ConfigError, check_choices, from_dict, setting

# ImageNet statistics in 0-255 units: the model normalizes uint8 pixels inside the patch embedding.
IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass
class ViTConfig:
    embed_dim: int = setting(384, "token width")
    depth: int = setting(12, "transformer blocks")
    num_heads: int = setting(6, "attention heads (divide embed_dim)")
    mlp_ratio: float = setting(4.0, "MLP hidden width / embed_dim")
    patch_size: int = setting(16, "patch side in pixels")
    img_size: int = setting(224, "base resolution: the learned pos-embed lives on its (img/p)^2 grid")
    num_classes: int = setting(1000, "classifier outputs")
    local: bool = setting(True, "locality MLP (dw-conv between the MLP's linears) vs timm's plain Mlp")
    dwconv_impl: str = setting("conv", "locality conv as conv (cuDNN depthwise) or taps (9 fusable mul-adds)",
                               choices=("conv", "taps"))
    sparse_locality: bool = setting(True, "sampled tokens: locality conv over kept tokens by the Triton kernel "
                                    "where it runs (CUDA); False: always scatter -> dense conv -> gather")
    token_resize: str = setting("pi", "the master patch weight at another patch size (--tokens): pi = FlexiViT "
                                      "PI-resize, pool = the same weights on the k×k-mean patch "
                                      "(fastvit.models.flexi)",
                                choices=("pi", "pool"))
    class_token: bool = setting(False, "prepend a class token")
    head: str = setting("gap", "gap: mean over kept tokens + fc_norm; token: norm + class token",
                        choices=("gap", "token"))
    pos_embed: str = setting("learned", "learned (resampled to the input grid) or sincos (fixed 2-D)",
                             choices=("learned", "sincos"))
    qkv_bias: bool = setting(True, "bias in the attention's qkv projection")
    drop_path_rate: float = setting(0.0, "stochastic depth rate of the last block")
    norm_eps: float = setting(1e-6, "LayerNorm eps (timm's ViT value, so exported weights give the same logits)")
    # Normalization fused into the embedding, in 0-255 units. uint8 images use these as given; float
    # images are taken to be in [0, 1] and use mean/255, std/255 (same logits as the uint8 image).
    mean: tuple = field(default=IMAGENET_MEAN_255)
    std: tuple = field(default=IMAGENET_STD_255)

    def __post_init__(self):
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        check_choices(self, flags=False)
        checks = [
            (self.head != "token" or self.class_token, "head='token' needs class_token=True"),
            (self.embed_dim % self.num_heads == 0, f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"),
            (self.pos_embed != "sincos" or self.embed_dim % 4 == 0, "sincos pos_embed needs embed_dim divisible by 4"),
            (self.img_size % self.patch_size == 0, f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"),
            (self.depth >= 1 and self.num_classes >= 0, "depth must be >= 1 and num_classes >= 0"),
            (len(self.mean) == 3 and len(self.std) == 3 and min(self.std) > 0, "mean/std must be 3 numbers, std > 0"),
            (0.0 <= self.drop_path_rate < 1.0, "drop_path_rate must be in [0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @property
    def base_grid(self) -> tuple[int, int]:
        g = self.img_size // self.patch_size
        return g, g

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.class_token else 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        """Unknown keys raise ConfigError (a ValueError) naming them."""
        return from_dict(cls, d, what="model config key")


# DeiT sizes; depth 12, patch 16, MLP ratio 4 for all.
_SIZES = {
    "tiny": dict(embed_dim=192, num_heads=3),
    "small": dict(embed_dim=384, num_heads=6),
    "base": dict(embed_dim=768, num_heads=12),
}

_REGISTRY: dict[str, dict] = {}


def register_model(name: str, **cfg) -> None:
    """Add a named variant; `cfg` are ViTConfig fields (checked when the model is created)."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = cfg


for _size, _dims in _SIZES.items():
    register_model(f"vit_{_size}_local", **_dims, local=True)
    register_model(f"vit_{_size}_plain", **_dims, local=False)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_config(name: str, **overrides) -> ViTConfig:
    """The registered variant `name` with `overrides` applied (unknown keys raise one clear error)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(list_models())}")
    return ViTConfig.from_dict({**_REGISTRY[name], **overrides})
