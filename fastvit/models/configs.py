"""Model configs and the registry: a small table of named variants, one checked dataclass.

Kept apart from the architecture (vit.py) so the network reads on its own and adding a variant is one
line here, not a 150-line registration block.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# ImageNet statistics in 0-255 units: the model normalizes uint8 pixels inside the patch embedding.
IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass
class ViTConfig:
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    patch_size: int = 16
    img_size: int = 224            # base resolution: the learned pos-embed lives on its (img/p)^2 grid
    num_classes: int = 1000
    local: bool = True             # locality MLP (dw-conv between the MLP's linears) vs timm's plain Mlp
    dwconv_impl: str = "conv"      # locality conv as "conv" (cuDNN depthwise) | "taps" (9 fusable mul-adds)
    class_token: bool = False
    head: str = "gap"              # "gap": mean over kept tokens + fc_norm; "token": norm + class token
    pos_embed: str = "learned"     # "learned" (resampled to the input grid) | "sincos" (fixed 2-D)
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6         # timm's ViT LayerNorm eps, so exported weights give the same logits
    # Normalization fused into the embedding, in 0-255 units. uint8 images use these as given; float
    # images are taken to be in [0, 1] and use mean/255, std/255 (same logits as the uint8 image).
    mean: tuple = field(default=IMAGENET_MEAN_255)
    std: tuple = field(default=IMAGENET_STD_255)

    def __post_init__(self):
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        checks = [
            (self.head in ("gap", "token"), f"head must be 'gap' or 'token', got {self.head!r}"),
            (self.dwconv_impl in ("conv", "taps"), f"dwconv_impl must be 'conv' or 'taps', got {self.dwconv_impl!r}"),
            (self.pos_embed in ("learned", "sincos"), f"pos_embed must be 'learned' or 'sincos', got {self.pos_embed!r}"),
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
                raise ValueError(msg)

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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)


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
