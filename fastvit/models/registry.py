"""create_model / list_models: build a registered variant (configs.py) with overrides."""
from __future__ import annotations

from .configs import ViTConfig, list_models, model_config
from .vit import LocalityViT


def create_model(name: str, num_classes: int = 1000, **overrides) -> LocalityViT:
    """`name` from list_models() (vit_{tiny,small,base}_{local,plain}); overrides are ViTConfig fields,
    e.g. drop_path_rate, img_size, depth, class_token, pos_embed="learned"|"sincos", head="gap"|"token"."""
    return LocalityViT(model_config(name, num_classes=num_classes, **overrides))


def model_from_config(cfg: ViTConfig | dict) -> LocalityViT:
    """Rebuild a model from a saved config (e.g. a checkpoint's or safetensors metadata)."""
    return LocalityViT(cfg if isinstance(cfg, ViTConfig) else ViTConfig.from_dict(cfg))


__all__ = ["create_model", "list_models", "model_from_config"]
