"""fastvit.kernels: from the loader's uint8 image batch straight to the kept patch tokens.

    tokens = embed_kept_patches(images, keep_idx, weight, bias, pos_embed, mean, std)   # (B,K,D)
    keep_idx = sample_keep_indices(B, N, K, device, generator=None)                     # (B,K)
    nbr = build_neighbours(keep_idx, (gh, gw))                                          # (B,K,9)
    y = sparse_local_dwconv(x, nbr, keep_idx, weight, bias, (gh, gw), act=True)         # (B,K,C)

`embed_kept_patches` and `sparse_local_dwconv` (the locality MLP's depthwise 3x3 conv over kept
tokens, + Hardswish) run the fused Triton kernel on CUDA (and on CPU tensors when
TRITON_INTERPRET=1), the plain-PyTorch reference otherwise; `embed_kept_patches_reference` is always
the reference. Importing this package imports no Triton.
"""
from .locality import build_neighbours
from .ops import embed_kept_patches, sparse_local_dwconv, use_triton
from .reference import embed_kept_patches_reference
from .sampling import sample_keep_indices

__all__ = ["build_neighbours", "embed_kept_patches", "embed_kept_patches_reference", "sample_keep_indices",
           "sparse_local_dwconv", "use_triton"]
