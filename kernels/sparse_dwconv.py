"""Triton kernels: depthwise 3x3 conv over the kept tokens only (the locality MLP's conv), + Hardswish.

Semantics (the reference in `reference_dwconv.py`: scatter into a zero-filled grid, dense conv, gather):

    z[b, j, c] = bias[c] + sum_{t<9} w[c, t] * x[b, nbr[b, j, t], c]      (x[.., -1, ..] = 0)
    y          = hardswish(z) if ACT else z                               fp32 math, one rounding

x (B,K,C) tokens x channels, channels contiguous (any batch/token strides: the MLP passes a slice
after its prefix tokens); nbr (B,K,9) int32 from `build_neighbours`: for tap t = (dy+1)*3 + (dx+1)
the index j' in [0, K) of the kept token at grid cell (gy+dy, gx+dx), or -1 (dropped or outside the
grid = the zero of the zero-filled grid). Tiles are (BLOCK_T tokens, BLOCK_C channels): every row
load is BLOCK_C contiguous channels of one token, so the 9 gathered rows are coalesced reads.

With ACT, z is rounded to x's dtype before the Hardswish (in the forward and in the backward's
recompute): the unfused path stores z in that dtype, and hardswish' jumps at z = +-3, so an fp32 z
could take the other branch than the reference's rounded one and change dx by half of dy.

Backward (two kernels, nothing saved but x):
  1. `_dw_bwd_w_kernel`, per (token tile, channel tile), the M tiles split over a few programs per
     channel tile: recompute z from the 9 neighbour rows (ACT only), dz = dy * hardswish'(z), store dz
     (only when ACT and dx is needed), and accumulate dW[c, t] += sum_j dz[j, c] * x[nbr[j, t], c] and
     dBias[c] += sum_j dz[j, c] in a (16, BLOCK_C) fp32 register tile; one fp32 atomic per program.
  2. `_dw_bwd_x_kernel`: dx[j', c] = sum_t w[c, t] * dz[nbr[j', 8 - t], c]. The kept-neighbour relation
     is symmetric (j is j''s tap-t neighbour iff j' is j's tap-(8-t) neighbour), so the transposed
     conv reads the same table with mirrored taps: no second table, no atomics, no scatter.
Atomics make the last bits of dW/dBias run-to-run nondeterministic (fp32 sums in any order).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .patch_embed import _interpreting, _sm_count


@triton.jit
def _hardswish_grad(z):
    # d/dz z*relu6(z+3)/6, with PyTorch's hardswish_backward boundaries (z < -3: 0, z <= 3: z/3 + 1/2)
    return tl.where(z < -3.0, 0.0, tl.where(z <= 3.0, z / 3.0 + 0.5, 1.0))


@triton.jit
def _rounded(z, dtype: tl.constexpr, RTNE_BITS: tl.constexpr):
    """fp32 z rounded to `dtype` (round to nearest even), returned as fp32. Triton's interpreter
    truncates fp32 -> bf16 casts (the GPU rounds to nearest), so under it (RTNE_BITS) bf16 rounding is
    done on the bits; storing the result then casts exactly."""
    if RTNE_BITS:
        u = z.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    return z.to(dtype).to(tl.float32)


@triton.jit
def _tile_rows(offs_t, M, K_KEEP, s_xb, s_nb, s_nk):
    """Tokens offs_t (BLOCK_T,) -> (mask, int64 batch offset into x, neighbour-row pointer offset)."""
    t_mask = offs_t < M
    b = (offs_t // K_KEEP).to(tl.int64)
    j = offs_t % K_KEEP
    return t_mask, b * s_xb, b * s_nb + j * s_nk


@triton.jit
def _conv_tile(x_ptr, nbr_ptr, w_ptr, x_row, n_row, t_mask, offs_c, c_mask, s_xk, MIRROR: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_T, BLOCK_C) fp32: sum over the 9 taps of w[c, tap] * x[nbr[token, tap or 8 - tap], c]."""
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for tap in tl.static_range(9):
        n = tl.load(nbr_ptr + n_row + (8 - tap if MIRROR else tap), mask=t_mask, other=-1)
        ok = n >= 0
        v = tl.load(x_ptr + (x_row + n.to(tl.int64) * s_xk)[:, None] + offs_c[None, :],
                    mask=ok[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_c * 9 + tap, mask=c_mask, other=0.0).to(tl.float32)
        acc += v * w[None, :]
    return acc


@triton.jit
def _dw_fwd_kernel(x_ptr, nbr_ptr, w_ptr, b_ptr, y_ptr, M, K_KEEP, C, s_xb, s_xk, s_nb, s_nk,
                   HAS_BIAS: tl.constexpr, ACT: tl.constexpr, RTNE_BITS: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # axis 0 = channel tiles (fastest): programs sharing a token block run together, and the
    # neighbour rows one token block gathers are mostly the next/previous grid row's: L2 hits.
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c_mask = offs_c < C
    t_mask, x_row, n_row = _tile_rows(offs_t, M, K_KEEP, s_xb, s_nb, s_nk)
    z = _conv_tile(x_ptr, nbr_ptr, w_ptr, x_row, n_row, t_mask, offs_c, c_mask, s_xk, False, BLOCK_T, BLOCK_C)
    if HAS_BIAS:
        z += tl.load(b_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    dtype = y_ptr.dtype.element_ty
    if ACT:  # z rounded to the storage dtype first, as the unfused conv's output is (see module doc)
        z = _rounded(z, dtype, RTNE_BITS)
        z = z * tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    out = offs_t.to(tl.int64)[:, None] * C + offs_c[None, :]
    tl.store(y_ptr + out, _rounded(z, dtype, RTNE_BITS).to(dtype), mask=t_mask[:, None] & c_mask[None, :])


@triton.jit
def _dw_bwd_w_kernel(x_ptr, nbr_ptr, w_ptr, b_ptr, dy_ptr, dz_ptr, dw_ptr, M, K_KEEP, C,
                     s_xb, s_xk, s_nb, s_nk,
                     HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_DZ: tl.constexpr,
                     NEED_W: tl.constexpr, RTNE_BITS: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    # grid (channel tiles, splits of the token tiles). dy, dz contiguous (M, C); dw (10, C) fp32
    # zeroed: rows 0-8 the taps, row 9 the bias.
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    c_mask = offs_c < C
    t_tiles = tl.cdiv(M, BLOCK_T)
    per_split = tl.cdiv(t_tiles, n_split)
    t_lo = pid_s * per_split
    t_hi = tl.minimum(t_lo + per_split, t_tiles)
    rows = tl.arange(0, 16)
    acc = tl.zeros((16, BLOCK_C), dtype=tl.float32)      # row t < 9: dW tap t; row 9: dBias
    for tt in range(t_lo, t_hi):
        offs_t = tt * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask, x_row, n_row = _tile_rows(offs_t, M, K_KEEP, s_xb, s_nb, s_nk)
        mask = t_mask[:, None] & c_mask[None, :]
        off = offs_t.to(tl.int64)[:, None] * C + offs_c[None, :]
        dz = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if ACT:
            z = _conv_tile(x_ptr, nbr_ptr, w_ptr, x_row, n_row, t_mask, offs_c, c_mask, s_xk, False,
                           BLOCK_T, BLOCK_C)
            if HAS_BIAS:
                z += tl.load(b_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
            dz = dz * _hardswish_grad(_rounded(z, x_ptr.dtype.element_ty, RTNE_BITS))   # as the forward
            if STORE_DZ:
                tl.store(dz_ptr + off, _rounded(dz, dz_ptr.dtype.element_ty, RTNE_BITS).to(dz_ptr.dtype.element_ty),
                         mask=mask)
        if NEED_W:
            for tap in tl.static_range(9):
                n = tl.load(nbr_ptr + n_row + tap, mask=t_mask, other=-1)
                v = tl.load(x_ptr + (x_row + n.to(tl.int64) * s_xk)[:, None] + offs_c[None, :],
                            mask=(n >= 0)[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
                acc += tl.where(rows[:, None] == tap, tl.sum(dz * v, axis=0)[None, :], 0.0)
        acc += tl.where(rows[:, None] == 9, tl.sum(dz, axis=0)[None, :], 0.0)
    tl.atomic_add(dw_ptr + rows[:, None] * C + offs_c[None, :], acc,
                  mask=(rows < 10)[:, None] & c_mask[None, :], sem="relaxed")


@triton.jit
def _dw_bwd_x_kernel(dz_ptr, nbr_ptr, w_ptr, dx_ptr, M, K_KEEP, C, s_nb, s_nk,
                     RTNE_BITS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # dz, dx contiguous (M, C): the transposed conv through mirrored taps of the same table.
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c_mask = offs_c < C
    t_mask, z_row, n_row = _tile_rows(offs_t, M, K_KEEP, K_KEEP * C, s_nb, s_nk)
    dx = _conv_tile(dz_ptr, nbr_ptr, w_ptr, z_row, n_row, t_mask, offs_c, c_mask, C, True, BLOCK_T, BLOCK_C)
    out = offs_t.to(tl.int64)[:, None] * C + offs_c[None, :]
    dtype = dx_ptr.dtype.element_ty
    tl.store(dx_ptr + out, _rounded(dx, dtype, RTNE_BITS).to(dtype), mask=t_mask[:, None] & c_mask[None, :])


# ----------------------------------------------------------------------------------------------
# launch helpers
# ----------------------------------------------------------------------------------------------

# (BLOCK_T, BLOCK_C, num_warps): 128 bf16 channels = 256 B per gathered row; 32 tokens a tile.
GPU_BLOCKS = (32, 128, 4)
# the interpreter: small tiles, so test sizes still have several tiles in both dimensions
INTERP_BLOCKS = (16, 32, 1)


def _rtne_bits(dtype: torch.dtype) -> bool:
    return _interpreting() and dtype == torch.bfloat16


def _blocks() -> tuple[int, int, int]:
    return INTERP_BLOCKS if _interpreting() else GPU_BLOCKS


def _prep(x: torch.Tensor, nbr: torch.Tensor):
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, nbr.contiguous()


def _launch(kernel, grid, device, *args, **meta):
    if _interpreting():
        kernel[grid](*args, **meta)
    else:
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)


def dwconv_forward(x: torch.Tensor, nbr: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   act: bool) -> torch.Tensor:
    """x (B,K,C), nbr (B,K,9), weight (C,1,3,3), bias (C,) or None -> (B,K,C) contiguous in x.dtype."""
    B, K, C = x.shape
    x, nbr = _prep(x, nbr)
    y = torch.empty((B, K, C), dtype=x.dtype, device=x.device)
    M = B * K
    if M == 0 or C == 0:
        return y
    bt, bc, warps = _blocks()
    grid = (triton.cdiv(C, bc), triton.cdiv(M, bt))
    _launch(_dw_fwd_kernel, grid, x.device, x, nbr, weight, bias if bias is not None else weight, y,
            M, K, C, x.stride(0), x.stride(1), nbr.stride(0), nbr.stride(1),
            HAS_BIAS=bias is not None, ACT=act, RTNE_BITS=_rtne_bits(x.dtype), BLOCK_T=bt, BLOCK_C=bc,
            num_warps=warps)
    return y


def dwconv_backward(grad: torch.Tensor, x: torch.Tensor, nbr: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, act: bool, need_x: bool, need_w: bool, need_b: bool):
    """grad (B,K,C) -> (dx like x or empty, dw like weight or empty, db like bias or empty)."""
    B, K, C = x.shape
    M = B * K
    x, nbr = _prep(x, nbr)
    grad = grad.contiguous()
    dx = torch.empty((B, K, C) if need_x else (0,), dtype=x.dtype, device=x.device)
    dwb = torch.zeros((10, C), dtype=torch.float32, device=x.device)     # rows 0-8 dW taps, row 9 dBias
    bt, bc, warps = _blocks()
    c_tiles, t_tiles = triton.cdiv(C, bc), triton.cdiv(M, bt)
    if M > 0 and C > 0:
        dz = grad
        store_dz = act and need_x
        if store_dz:
            dz = torch.empty((B, K, C), dtype=grad.dtype, device=x.device)
        if need_w or need_b or store_dz:
            if _interpreting():
                splits = min(2, t_tiles)             # two splits: the tests see the atomic reduction
            else:
                dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
                splits = max(1, min(t_tiles, triton.cdiv(4 * _sm_count(dev), c_tiles)))
            _launch(_dw_bwd_w_kernel, (c_tiles, splits), x.device, x, nbr, weight,
                    bias if bias is not None else weight, grad, dz, dwb, M, K, C,
                    x.stride(0), x.stride(1), nbr.stride(0), nbr.stride(1),
                    HAS_BIAS=bias is not None, ACT=act, STORE_DZ=store_dz, NEED_W=need_w,
                    RTNE_BITS=_rtne_bits(x.dtype), BLOCK_T=bt, BLOCK_C=bc, num_warps=warps)
        if need_x:
            _launch(_dw_bwd_x_kernel, (c_tiles, t_tiles), x.device, dz, nbr, weight, dx, M, K, C,
                    nbr.stride(0), nbr.stride(1), RTNE_BITS=_rtne_bits(x.dtype), BLOCK_T=bt, BLOCK_C=bc, num_warps=warps)
    # fresh tensors, not views of dwb: a custom op's outputs may not alias each other
    dw = dwb[:9].t().contiguous().to(weight.dtype).view(weight.shape) if need_w else weight.new_empty((0,))
    db = dwb[9].to(bias.dtype, copy=True) if need_b and bias is not None else x.new_empty((0,))
    return dx, dw, db
