"""One master patch-embedding weight at any patch size: FlexiViT's pseudo-inverse resize (PI-resize,
Beyer et al., CVPR 2023; big_vision's flexi/vit.py and timm's resample_patch_embed do the same), or the
same weights applied to a pooled patch (pool_resize, the stride alternative).

    w8 = pi_resize(w16, 8)        # (D,3,16,16) -> (D,3,8,8), differentiable in w16
    w32 = pool_resize(w16, 32)    # (D,3,16,16) -> (D,3,32,32): the master kernel on the 2x2-mean patch

Let B be the (q², p²) matrix of the image resize from p×p to q×q patches (bilinear, antialiased when
shrinking, each column the resize of one basis pixel). PI-resize picks ŵ = pinv(Bᵀ)·w:
  - q ≥ p (upsampling, B has full column rank): ⟨B·x, ŵ⟩ = ⟨x, w⟩ for every p×p patch x, i.e. a patch
    resized up to q gives exactly the token the master weight gives the original patch;
  - q < p: ŵ is the least-squares solution of Bᵀŵ ≈ w (the normal equations B·Bᵀ·ŵ = B·w hold);
  - q = p: ŵ = w (the weight itself, no arithmetic).
The matrix pinv(Bᵀ) depends only on (p, q): it is computed once per (p, q, device, dtype) and cached
(in eager mode; under torch.compile it is traced as constants of the graph).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_CACHE: dict = {}


def resize_matrix(p: int, q: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """B (q*q, p*p): column j = the p×p basis image e_j resized to q×q (bilinear, antialias)."""
    eye = torch.eye(p * p, dtype=dtype, device=device).reshape(p * p, 1, p, p)
    out = F.interpolate(eye, size=(q, q), mode="bilinear", antialias=q < p, align_corners=False)
    return out.reshape(p * p, q * q).T                                          # (q²,p²)


def pi_matrix(p: int, q: int, dtype: torch.dtype, device) -> torch.Tensor:
    """pinv(Bᵀ) (q², p²), computed in fp64 and cached per (p, q, dtype, device)."""
    key = (p, q, dtype, str(device))
    m = _CACHE.get(key)
    if m is None:
        m = torch.linalg.pinv(resize_matrix(p, q).T).to(dtype=dtype, device=device)   # (q²,p²)
        if not torch.compiler.is_compiling():
            _CACHE[key] = m
    return m


def pi_resize(weight: torch.Tensor, q: int) -> torch.Tensor:
    """(D,C,p,p) -> (D,C,q,q) by PI-resize; the weight itself when q == p."""
    D, C, p, p2 = weight.shape
    if p != p2:
        raise ValueError(f"patch weights must be square, got {tuple(weight.shape)}")
    if q == p:
        return weight
    if q < 1:
        raise ValueError(f"patch size must be positive, got {q}")
    m = pi_matrix(p, q, torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype,
                  weight.device)
    w = weight.reshape(D * C, p * p).to(m.dtype) @ m.T                          # (D*C,q²)
    return w.reshape(D, C, q, q).to(weight.dtype)


def pool_resize(weight: torch.Tensor, q: int) -> torch.Tensor:
    """(D,C,p,p) -> (D,C,q,q): the SAME master weights applied to the patch box-resized to p×p, folded
    into one q×q kernel so the token layout (and every kernel after it) is unchanged. With k = q/p or p/q:

      q = k·p: ŵ[c, k·i+a, k·j+b] = w[c,i,j] / k²   (a, b < k), i.e. ⟨x, ŵ⟩ = ⟨avgpool_k(x), w⟩: the
               master kernel, stride p, over the image average-pooled by k (every pixel counts once);
      q = p/k: ŵ[c,i,j] = Σ_{a,b<k} w[c, k·i+a, k·j+b], i.e. ⟨x, ŵ⟩ = ⟨nearest_up_k(x), w⟩;
      q = p:   ŵ = w (the weight itself).

    Plain dilation (ŵ = w on every k-th pixel, zeros between) was not chosen: it reads 1/k² of the
    pixels, so a coarse token aliases and depends on the pixel phase; the pooled form costs the same."""
    D, C, p, p2 = weight.shape
    if p != p2:
        raise ValueError(f"patch weights must be square, got {tuple(weight.shape)}")
    if q == p:
        return weight
    if q < 1 or (q % p and p % q):
        raise ValueError(f"pool resize needs patch sizes that divide each other, got {p} and {q}")
    if q > p:
        k = q // p
        return weight.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3) / (k * k)
    k = p // q
    return weight.reshape(D, C, q, k, q, k).sum(dim=(3, 5))


RESIZES = {"pi": pi_resize, "pool": pool_resize}
