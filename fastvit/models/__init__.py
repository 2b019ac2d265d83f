"""fastvit.models: the locality ViT that trains on sampled patches at any resolution.

    from fastvit.models import create_model, list_models, compile_model
    m = create_model("vit_small_local", num_classes=1000, drop_path_rate=0.1)
    logits = m(images_u8, keep_rate=0.5)            # or keep_idx=(B,K); float images in [0, 1]

Files: configs.py (ViTConfig + the variant table), registry.py (create_model), layers.py (pure
functions + thin modules), vit.py (the model), compile.py (ahead-of-time torch.compile per shape),
export.py (safetensors, timm export), baseline.py (timm's plain ViT behind our forward, for
--recipe baseline), droppath.py (the drop-path rate as a schedule).
"""
from .baseline import TimmBaseline, create_baseline
from .compile import compile_model
from .droppath import DropPathRate
from .configs import IMAGENET_MEAN_255, IMAGENET_STD_255, ViTConfig, model_config, register_model
from .export import export_timm, load_safetensors, save_safetensors, timm_kwargs
from .layers import Attention, LocalityMlp, local_dwconv
from .registry import create_model, list_models, model_from_config
from .vit import LocalityViT, num_kept_patches, train_flops, train_flops_per_image, vit_forward_flops

__all__ = [
    "create_model", "list_models", "model_from_config", "model_config", "register_model", "ViTConfig",
    "LocalityViT", "LocalityMlp", "Attention", "local_dwconv", "num_kept_patches", "vit_forward_flops",
    "train_flops", "train_flops_per_image",
    "compile_model", "export_timm", "timm_kwargs", "save_safetensors", "load_safetensors",
    "IMAGENET_MEAN_255", "IMAGENET_STD_255", "TimmBaseline", "create_baseline", "DropPathRate",
]
