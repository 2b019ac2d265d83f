"""Which patches each image keeps: uniform random K of N, sorted ascending."""
from __future__ import annotations

import torch


def sample_keep_indices(B: int, N: int, K: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,K) int64: per image K distinct patch indices drawn uniformly from range(N), sorted ascending.

    top-K of i.i.d. uniform noise is a uniform random K-subset (PSS / timm PatchDropout draw it this
    way); sorting keeps the kernel's image reads in raster order. Reproducible with `generator`
    (which must live on `device`).
    """
    if not 1 <= K <= N:
        raise ValueError(f"need 1 <= K <= N, got K={K}, N={N}")
    if B < 0:
        raise ValueError(f"B must be >= 0, got {B}")
    noise = torch.rand(B, N, device=device, generator=generator)  # (B,N)
    idx = noise.topk(K, dim=1, sorted=False).indices              # (B,K) distinct per row
    return idx.sort(dim=1).values
