"""Interop: safetensors state dicts (config in the metadata) and timm VisionTransformer weights."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .configs import ViTConfig
from .vit import LocalityViT
from ..fileio import commit, tmp_name

_CONFIG_KEY = "fastvit_config"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind a torch.compile wrapper (whose state_dict keys carry `_orig_mod.`)."""
    return getattr(model, "_orig_mod", model)


def _exported(model: nn.Module) -> nn.Module:
    """The plain module, and a progressively grown one at the depth it runs (fastvit.models.grow.compact)."""
    from .grow import compact

    return compact(unwrap(model))


def save_safetensors(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write model's state dict to `path` atomically (tmp + fsync + rename); the config rides along
    in the metadata so load_safetensors(path) can rebuild the model by itself."""
    model = _exported(model)
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": "pt"}
    if isinstance(model, LocalityViT):
        metadata[_CONFIG_KEY] = json.dumps(model.cfg.to_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        commit(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_safetensors(path: str | os.PathLike, model: nn.Module | None = None, *, strict: bool = True,
                     device: str | torch.device = "cpu") -> nn.Module:
    """Load weights from `path` into `model`, or (model None) into a model rebuilt from the saved
    config. Returns the model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no safetensors file at {path}")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if model is None:
        if _CONFIG_KEY not in meta:
            raise ValueError(f"{path} has no fastvit config in its metadata; pass the model to load into")
        model = LocalityViT(ViTConfig.from_dict(json.loads(meta[_CONFIG_KEY]))).to(device)
    unwrap(model).load_state_dict(state, strict=strict)
    return model


def timm_kwargs(model: nn.Module) -> dict:
    """kwargs for timm.create_model("vit_...", pretrained=False, **kwargs) (or VisionTransformer(**kwargs))
    that make timm compute what this `_plain` model computes on the normalized float image."""
    cfg = _plain_cfg(model)
    return dict(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, num_classes=cfg.num_classes,
        class_token=cfg.class_token,
        global_pool="token" if cfg.head == "token" else "avg",
        fc_norm=cfg.head == "gap",          # pool -> fc_norm (timm's avg-pool default) vs norm -> token
        no_embed_class=True,                # our pos-embed covers the patch grid only, not the class token
        dynamic_img_size=True,              # timm then resamples pos_embed like we do at other resolutions
    )


def export_timm(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict for timm's VisionTransformer built with timm_kwargs(model).

    Names already match (we follow timm's); the only rewrites are the fixed sin-cos table, which timm
    stores as the pos_embed parameter. Locality models have no timm counterpart and are refused.
    """
    m = _exported(model)
    cfg = _plain_cfg(m)
    out = {k: v.detach().clone() for k, v in m.state_dict().items()}
    if cfg.pos_embed == "sincos":
        out["pos_embed"] = m.pos_embed_fixed.detach().clone()                      # (1,N0,D)
    return out


def _plain_cfg(model: nn.Module) -> ViTConfig:
    m = _exported(model)
    if not isinstance(m, LocalityViT):
        raise TypeError(f"expected a fastvit LocalityViT, got {type(m).__name__}")
    if m.cfg.local:
        raise ValueError("only `_plain` models export to timm: the locality MLP (depthwise conv) has no "
                         "counterpart in timm's VisionTransformer")
    return m.cfg
