"""Layers of the locality ViT: pure functions, each wrapped by a thin nn.Module (timm style).

Shapes: B batch, N = gh*gw patches of the input's grid (row-major), K kept patches, P prefix (class)
tokens, T = P + K tokens, D embed dim, C = hidden channels of the MLP.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvit.kernels import sparse_local_dwconv


DWCONV_IMPLS = ("conv", "taps")


def dwconv_taps(grid: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise kxk conv (zero padding k//2) on a channels-last (B,gh,gw,C) grid as k*k shifted
    multiply-adds. Same maths as F.conv2d(groups=C); written in pointwise ops so torch.compile can fuse
    it with the scatter, the gather and both Hardswishes into one kernel instead of calling cuDNN's
    depthwise conv between them. Accumulates in fp32 (weights are fp32 masters); returns grid's dtype."""
    B, gh, gw, C = grid.shape
    k = weight.shape[-1]
    r = k // 2
    padded = F.pad(grid, (0, 0, r, r, r, r))                                    # (B,gh+2r,gw+2r,C)
    taps = weight.reshape(C, k * k).t()                                         # (k*k,C)
    y = bias.float() if bias is not None else grid.new_zeros((), dtype=torch.float32)
    for i in range(k):
        for j in range(k):
            y = y + padded[:, i:i + gh, j:j + gw, :].float() * taps[i * k + j].float()
    return y.to(grid.dtype)                                                     # (B,gh,gw,C)


def _grid_rows(keep_idx: torch.Tensor, N: int) -> torch.Tensor:
    """Row index into the (B*N, C) grid: one flat index serves scatter and gather, and rows are
    contiguous C-vectors (cheaper than scatter/gather with an index expanded over C)."""
    B = keep_idx.shape[0]
    return (keep_idx + torch.arange(B, device=keep_idx.device).unsqueeze(1) * N).reshape(-1)


def scatter_to_grid(x: torch.Tensor, keep_idx: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """(B,K,C) kept tokens -> (B,gh,gw,C) zero-filled grid (what local_dwconv convolves)."""
    B, K, C = x.shape
    rows = _grid_rows(keep_idx, gh * gw)
    return x.new_zeros(B * gh * gw, C).index_put((rows,), x.reshape(B * K, C)).view(B, gh, gw, C)


def local_dwconv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 grid_hw: tuple[int, int], keep_idx: torch.Tensor | None = None,
                 impl: str = "conv") -> torch.Tensor:
    """Depthwise conv over the 2-D patch grid, seen only through the kept tokens.

    x: (B,K,C) tokens of the kept patches, in the order of `keep_idx` (B,K) (distinct indices into the
    row-major gh x gw grid); keep_idx None means all N = gh*gw patches in raster order (K == N).
    weight: (C,1,k,k) (nn.Conv2d(C, C, k, groups=C) layout). Returns (B,K,C).

    Dropped patches are zeros in the grid, so each kept token mixes only with kept neighbours (and the
    image border is zero padding, as in the dense conv). With all patches kept this IS the dense conv,
    so the model trains on sampled patches and evaluates on all of them with the same weights.
    impl: "conv" (F.conv2d, cuDNN on the GPU) or "taps" (dwconv_taps, fusable by torch.compile).
    """
    B, K, C = x.shape
    gh, gw = grid_hw
    N = gh * gw
    if keep_idx is None:
        if K != N:
            raise ValueError(f"without keep_idx x must hold all {gh}x{gw}={N} tokens, got {K}")
        grid = x                                                              # (B,N,C)
    else:
        flat = _grid_rows(keep_idx, N)                                          # (B*K,)
        grid = scatter_to_grid(x, keep_idx, gh, gw).view(B, N, C)               # zero-filled
    if impl == "taps":
        y = dwconv_taps(grid.view(B, gh, gw, C), weight, bias).reshape(B, N, C)   # (B,N,C)
    elif impl == "conv":
        k = weight.shape[-1]
        # (B,N,C) viewed as NCHW with channels-last strides: no copy, what cuDNN likes for depthwise.
        y = F.conv2d(grid.view(B, gh, gw, C).permute(0, 3, 1, 2), weight, bias, padding=k // 2, groups=C)
        y = y.permute(0, 2, 3, 1).reshape(B, N, C)                               # (B,N,C)
    else:
        raise ValueError(f"impl must be one of {DWCONV_IMPLS}, got {impl!r}")
    if keep_idx is None:
        return y
    return y.reshape(B * N, C)[flat].view(B, K, C)                               # gather back (B,K,C)


class LocalityMlp(nn.Module):
    """LocalViT's feed-forward (Li et al. 2021; as used by Irandoust et al. 2022):
    Linear(D->C) -> Hardswish -> depthwise kxk conv over the token grid -> Hardswish -> Linear(C->D).

    Prefix (class) tokens bypass the conv only: they still go through both linears and activations.
    """

    def __init__(self, dim: int, hidden: int, kernel_size: int = 3, impl: str = "conv"):
        super().__init__()
        self.impl = impl
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.Hardswish()
        # nn.Conv2d only as the parameter holder: its layout and default init; local_dwconv runs it.
        self.conv = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, grid_hw: tuple[int, int], keep_idx: torch.Tensor | None = None,
                num_prefix: int = 0, nbr: torch.Tensor | None = None) -> torch.Tensor:
        """nbr: the step's neighbour table (fastvit.kernels.build_neighbours of keep_idx) -> the sparse
        kernel (conv over kept tokens + the second Hardswish, fused); None -> local_dwconv."""
        h = self.act(self.fc1(x))                                                  # (B,T,C)
        conv = self.conv
        if nbr is not None and keep_idx is not None and conv.kernel_size == (3, 3):
            y = sparse_local_dwconv(h[:, num_prefix:], nbr, keep_idx, conv.weight, conv.bias, grid_hw, act=True)
            if num_prefix:
                y = torch.cat([self.act(h[:, :num_prefix]), y], dim=1)                # (B,T,C)
            return self.fc2(y)                                                     # (B,T,D)
        if num_prefix:
            prefix, h = h[:, :num_prefix], h[:, num_prefix:]                       # (B,P,C), (B,K,C)
            h = local_dwconv(h, self.conv.weight, self.conv.bias, grid_hw, keep_idx, self.impl)
            h = torch.cat([prefix, h], dim=1)                                      # (B,T,C)
        else:
            h = local_dwconv(h, self.conv.weight, self.conv.bias, grid_hw, keep_idx, self.impl)
        return self.fc2(self.act(h))                                               # (B,T,D)


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (flash/mem-efficient on GPU).
    Parameter names match timm's Attention (qkv, proj) so `_plain` weights export 1:1."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                                    # (B,h,T,hd) each
        x = F.scaled_dot_product_attention(q, k, v)                                # (B,h,T,hd)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))                       # (B,T,D)
