"""The locality conv over kept tokens: the neighbour table, and the plain-PyTorch reference.

    nbr = build_neighbours(keep_idx, (gh, gw))            # (B,K,9) int32, once per forward
    y   = sparse_local_dwconv(x, nbr, keep_idx, weight, bias, (gh, gw), act=True)   # (B,K,C)

Table: nbr[b, j, t] for tap t = (dy+1)*3 + (dx+1) (weight's row-major 3x3 order) is the position j' in
keep_idx[b] of the kept patch at grid cell (gy+dy, gx+dx) of patch keep_idx[b, j] = gy*gw + gx, or -1
when that cell is outside the grid or not kept (the zeros of the reference's zero-filled grid).
keep_idx rows must hold distinct indices (as local_dwconv requires). Built with a handful of small
gather/scatter ops on (B, N) and (B, K, 9) int tensors, no host sync; every block of the step reuses it.

The reference (the CPU path and the tests' oracle) is `fastvit.kernels.reference.local_dwconv`: scatter the
kept tokens into a zero-filled grid, dense depthwise conv, gather back; then Hardswish if `act`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import local_dwconv, scatter_to_grid

# tap t = (dy+1)*3 + (dx+1): grid offsets of the 9 taps
_DY = (-1, -1, -1, 0, 0, 0, 1, 1, 1)
_DX = (-1, 0, 1, -1, 0, 1, -1, 0, 1)


def build_neighbours(keep_idx: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(B,K) distinct patch indices into the row-major gh x gw grid -> (B,K,9) int32 neighbour table."""
    if keep_idx.dim() != 2:
        raise ValueError(f"keep_idx must be (B,K), got {tuple(keep_idx.shape)}")
    B, K = keep_idx.shape
    gh, gw = grid_hw
    N = gh * gw
    dev = keep_idx.device
    idx = keep_idx.long()
    # slot[b, n]: position of patch n in keep_idx[b], -1 if dropped; column N is the "outside" cell
    slot = torch.full((B, N + 1), -1, dtype=torch.int32, device=dev)
    slot.scatter_(1, idx, torch.arange(K, dtype=torch.int32, device=dev).expand(B, K))
    dy = torch.tensor(_DY, device=dev)
    dx = torch.tensor(_DX, device=dev)
    ny = (idx // gw).unsqueeze(-1) + dy                                          # (B,K,9)
    nx = (idx % gw).unsqueeze(-1) + dx
    inside = (ny >= 0) & (ny < gh) & (nx >= 0) & (nx < gw)
    cell = torch.where(inside, ny * gw + nx, N)
    return torch.gather(slot, 1, cell.reshape(B, K * 9)).view(B, K, 9)


def reference_forward(x, keep_idx, weight, bias, grid_hw, act: bool) -> torch.Tensor:
    """scatter -> dense conv -> gather (reference.local_dwconv, impl "conv"), + Hardswish."""

    with torch.autocast(x.device.type, enabled=False):
        y = local_dwconv(x, weight, bias, tuple(grid_hw), keep_idx, "conv")
        return F.hardswish(y) if act else y


def reference_backward(grad, x, keep_idx, weight, bias, grid_hw, act: bool,
                       need_x: bool, need_w: bool, need_b: bool):
    """The backward of `reference_forward` through the same scatter -> conv -> gather path (the op's CPU
    backward; tests check it against autograd): (dx or empty, dw or empty, db or empty).

        z  = conv(x);  dz = hardswish'(z) * grad (act) or grad
        dx = the conv with the kernel flipped, on dz (the transposed conv; gather = scatter^T)
        dw[c, i, j] = sum over kept tokens of dz * (zero-filled, padded x grid shifted by (i, j)); fp32
        db = sum of dz over tokens (fp32)
    """

    B, K, C = x.shape
    gh, gw = grid_hw
    acc = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        dz = grad
        if act:
            z = local_dwconv(x, weight, bias, (gh, gw), keep_idx, "conv")
            dz = torch.ops.aten.hardswish_backward(grad.to(z.dtype), z)
        dx = x.new_empty((0,))
        if need_x:
            dx = local_dwconv(dz.to(x.dtype), weight.flip(-1, -2), None, (gh, gw), keep_idx, "conv")
        dw = weight.new_empty((0,))
        if need_w:
            xg = F.pad(scatter_to_grid(x.to(acc), keep_idx, gh, gw), (0, 0, 1, 1, 1, 1))   # (B,gh+2,gw+2,C)
            dzg = scatter_to_grid(dz.to(acc), keep_idx, gh, gw)                           # (B,gh,gw,C)
            taps = [(dzg * xg[:, i:i + gh, j:j + gw]).sum((0, 1, 2)) for i in range(3) for j in range(3)]
            dw = torch.stack(taps, 1).view(C, 1, 3, 3).to(weight.dtype)
        db = dz.to(acc).sum((0, 1)).to(bias.dtype) if need_b and bias is not None else x.new_empty((0,))
    return dx, dw, db
