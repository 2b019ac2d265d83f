"""fastvit.kernels: from the loader's uint8 image batch straight to the kept patch tokens.

    tokens = embed_kept_patches(images, keep_idx, weight, bias, pos_embed, mean, std)   # (B,K,D)
    keep_idx = sample_keep_indices(B, N, K, device, generator=None)                     # (B,K)

`embed_kept_patches` runs the fused Triton kernel on CUDA (and on CPU tensors when
TRITON_INTERPRET=1), the plain-PyTorch reference otherwise; `embed_kept_patches_reference` is always
the reference. Importing this package imports no Triton.
"""
from .ops import embed_kept_patches
from .reference import embed_kept_patches_reference
from .sampling import sample_keep_indices

__all__ = ["embed_kept_patches", "embed_kept_patches_reference", "sample_keep_indices"]
