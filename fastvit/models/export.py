"""Interop: safetensors state dicts (config in the metadata), timm VisionTransformer weights, and a folder of
either with its config.json (preprocessing, class names) that fastvit-export writes."""
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
from ..fileio import commit, tmp_name, write_json_atomic

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
    return _write_tensors(tensors, path, metadata)


def _write_tensors(tensors: dict, path: Path, metadata: dict) -> Path:
    """save_file, atomically (tmp + fsync + rename): `path` is the old file or the whole new one."""
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


# ------------------------------------------------------------------------------------------------------
# a folder another person loads: weights + config.json (architecture, preprocessing, class names)

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
FORMATS = ("safetensors", "timm")


def timm_architecture(model: nn.Module) -> str:
    """The timm entry point for a `_plain` model (its shape comes from timm_kwargs, which override the
    entry point's defaults): vit_{tiny,small,base}_patch16_224 by the embedding width, else the small one."""
    width = {192: "tiny", 384: "small", 768: "base"}.get(_plain_cfg(model).embed_dim, "small")
    return f"vit_{width}_patch16_224"


def pretrained_cfg(model: nn.Module, *, res: int, crop_pct: float) -> dict:
    """timm's preprocessing fields (PretrainedCfg) of `model`: input size, mean/std in 0-1 units, the val
    center crop."""
    cfg = _exported(model).cfg
    return {"input_size": [3, res, res], "fixed_input_size": False, "crop_pct": crop_pct, "crop_mode": "center",
            "interpolation": "bilinear", "mean": [v / 255.0 for v in cfg.mean], "std": [v / 255.0 for v in cfg.std],
            "num_classes": cfg.num_classes}


INPUTS = {"safetensors": "uint8 (B,3,H,W) pixels 0-255, or float in [0, 1]: the model normalizes with mean/std "
                         "itself; any H, W that are multiples of the patch size",
          "timm": "float (B,3,H,W) normalized with pretrained_cfg mean/std (timm's convention)"}


def export_folder(model: nn.Module, out: str | os.PathLike, *, fmt: str = "safetensors", res: int,
                  crop_pct: float, label_names: list[str] | None = None, extra: dict | None = None) -> dict:
    """Write `out`/model.safetensors and `out`/config.json (atomically) and return the config.

    fmt "safetensors": our state dict with the ViTConfig in its metadata (load_export / load_safetensors
    rebuild the model); "timm": timm VisionTransformer weights (export_timm) and a config.json in timm's
    hub layout (architecture, num_classes, model_args, pretrained_cfg, label_names), so
    `timm.create_model(architecture, num_classes=..., **model_args)` + load_state_dict takes them, as
    does timm's own `timm.create_model("local-dir:OUT", pretrained=True)`. ValueError for a locality model
    in the timm format (no timm counterpart)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    out = Path(out)
    m = _exported(model)
    if fmt == "timm":
        tensors = {k: v.contiguous().cpu() for k, v in export_timm(m).items()}
        kwargs = timm_kwargs(m)
        num_classes = kwargs.pop("num_classes")
        config = {"architecture": timm_architecture(m), "num_classes": num_classes,
                  "num_features": m.cfg.embed_dim, "model_args": kwargs}
    else:
        tensors = None
        config = {"architecture": "fastvit.LocalityViT", "num_classes": m.cfg.num_classes,
                  "num_features": m.cfg.embed_dim, "model_config": m.cfg.to_dict()}
    config["format"], config["input"] = fmt, INPUTS[fmt]
    config["pretrained_cfg"] = pretrained_cfg(m, res=res, crop_pct=crop_pct)
    if label_names is not None:
        config["label_names"] = list(label_names)
    config.update(extra or {})
    out.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        save_safetensors(m, out / WEIGHTS_NAME)
    else:
        _write_tensors(tensors, out / WEIGHTS_NAME, {"format": "pt"})
    write_json_atomic(out / CONFIG_NAME, config)
    return config


def load_export(folder: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The model of an export_folder() folder, either format (timm: a timm VisionTransformer)."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    if config.get("format") == "timm":
        import timm
        from safetensors.torch import load_file

        model = timm.create_model(config["architecture"], pretrained=False, num_classes=config["num_classes"],
                                  **config["model_args"])
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME), device=str(device)))
        return model.to(device)
    return load_safetensors(folder / WEIGHTS_NAME, device=device)
