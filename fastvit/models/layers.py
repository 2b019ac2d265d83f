"""Layers of the locality ViT: pure functions, each wrapped by a thin nn.Module (timm style).

Shapes: B batch, N = gh*gw patches of the input's grid (row-major), K kept patches, P prefix (class)
tokens, T = P + K tokens, D embed dim, C = hidden channels of the MLP.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvit.kernels import sparse_local_dwconv
from fastvit.kernels.reference import DWCONV_IMPLS, dwconv_taps, local_dwconv, scatter_to_grid  # noqa: F401


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
