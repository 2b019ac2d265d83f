"""`embed_kept_patches` as a PyTorch custom op: dispatch, fake (meta) kernels and autograd.

    fastvit::embed_kept_patches           forward  (B,3,H,W),(B,K) -> (B,K,D)
    fastvit::embed_kept_patches_backward  (dY) -> (dW, dPos in fp32 (fp64 for fp64)); dBias = dPos.sum(0)

Both are opaque `torch.library.custom_op`s with fake kernels, so `torch.compile(fullgraph=True)`
traces a model that calls them without a graph break; `register_autograd` wraps them in the
autograd.Function that gives grads for weight, bias and pos_embed (never for images/keep_idx).

Dispatch (inside the ops, so compiled graphs dispatch the same way): the fused Triton kernels for
CUDA tensors, and for CPU tensors when TRITON_INTERPRET=1; the plain-PyTorch reference otherwise.
Triton is imported on the first Triton call, never at import time.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from . import locality
from .reference import (as_triple, check_inputs, compute_dtype, grad_accum_dtype, reference_backward,
                        reference_forward)


# compute dtypes the fused GEMM supports; anything else (fp64) takes the reference path
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_triton(t: torch.Tensor) -> bool:
    """Whether the fused kernels run for tensors on t's device (read at call time, not import)."""
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


@torch.library.custom_op("fastvit::embed_kept_patches", mutates_args=())
def _embed_op(images: torch.Tensor, keep_idx: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor], pos_embed: torch.Tensor,
              mean: Sequence[float], std: Sequence[float], out_dtype: torch.dtype) -> torch.Tensor:
    if use_triton(images) and out_dtype in FUSED_DTYPES:
        from .patch_embed import embed_forward

        return embed_forward(images, keep_idx, weight, bias, pos_embed, mean, std, out_dtype)
    return reference_forward(images, keep_idx, weight, bias, pos_embed, mean, std, out_dtype)


@_embed_op.register_fake
def _(images, keep_idx, weight, bias, pos_embed, mean, std, out_dtype):
    B, K = keep_idx.shape
    return images.new_empty((B, K, weight.shape[0]), dtype=out_dtype)


@torch.library.custom_op("fastvit::embed_kept_patches_backward", mutates_args=())
def _embed_backward_op(grad: torch.Tensor, images: torch.Tensor, keep_idx: torch.Tensor,
                       weight: torch.Tensor, pos_embed: torch.Tensor,
                       mean: Sequence[float], std: Sequence[float],
                       need_weight: bool, need_pos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(images) and grad.dtype in FUSED_DTYPES:
        from .patch_embed import embed_backward

        return embed_backward(grad, images, keep_idx, weight, pos_embed, mean, std, need_weight, need_pos)
    return reference_backward(grad, images, keep_idx, weight, pos_embed, mean, std, need_weight, need_pos)


@_embed_backward_op.register_fake
def _(grad, images, keep_idx, weight, pos_embed, mean, std, need_weight, need_pos):
    dw = weight.new_empty(weight.shape if need_weight else (0,))
    dpos = pos_embed.new_empty(pos_embed.shape if need_pos else (0,), dtype=grad_accum_dtype(grad.dtype))
    return dw, dpos


def _setup_context(ctx, inputs, output):
    images, keep_idx, weight, bias, pos_embed, mean, std, out_dtype = inputs
    ctx.save_for_backward(images, keep_idx, weight, pos_embed)  # patches are recomputed, not saved
    ctx.mean, ctx.std = mean, std
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad):
    images, keep_idx, weight, pos_embed = ctx.saved_tensors
    need_w, need_b, need_pos = ctx.needs_input_grad[2], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    dw, dpos_acc = torch.ops.fastvit.embed_kept_patches_backward(
        grad, images, keep_idx, weight, pos_embed, ctx.mean, ctx.std, need_w, need_b or need_pos)
    d_weight = dw if need_w else None
    d_bias = dpos_acc.sum(0).to(ctx.bias_dtype) if need_b else None  # each token hits one pos row
    d_pos = dpos_acc.to(pos_embed.dtype) if need_pos else None
    return None, None, d_weight, d_bias, d_pos, None, None, None


_embed_op.register_autograd(_backward, setup_context=_setup_context)


def embed_kept_patches(images: torch.Tensor, keep_idx: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None, pos_embed: torch.Tensor,
                       mean: Sequence[float] | float, std: Sequence[float] | float) -> torch.Tensor:
    """Kept patch tokens (B,K,D) straight from the image batch (see fastvit.kernels).

    images (B,3,H,W) uint8 or float; keep_idx (B,K) int32/int64 into the row-major (H/p)x(W/p) grid
    (repeats allowed); weight (D,3,p,p); bias (D,) or None; pos_embed (N,D); mean/std: 1 or 3
    numbers in the units of images (floats; a tensor costs a host sync). Output dtype: the autocast
    dtype when autocast is on for the images' device, else weight.dtype; the GEMM accumulates in
    fp32 and bias/pos_embed are added in fp32. Grads flow to weight, bias, pos_embed in their dtypes.
    Indices outside [0, N) are not checked on the fused path (that would cost a host sync).
    """
    check_inputs(images, keep_idx, weight, bias, pos_embed)
    return torch.ops.fastvit.embed_kept_patches(
        images, keep_idx, weight, bias, pos_embed,
        list(as_triple(mean, "mean")), list(as_triple(std, "std")), compute_dtype(images, weight))


# ---------------------------------------------------------------------------------------------------
# sparse locality conv: depthwise 3x3 over the kept tokens (+ Hardswish), see sparse_dwconv.py
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastvit::sparse_dwconv3x3", mutates_args=())
def _dwconv_op(x: torch.Tensor, nbr: torch.Tensor, keep_idx: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor], gh: int, gw: int, act: bool) -> torch.Tensor:
    if use_triton(x) and x.dtype in FUSED_DTYPES:
        from .sparse_dwconv import dwconv_forward

        return dwconv_forward(x, nbr, weight, bias, act)
    return locality.reference_forward(x, keep_idx, weight, bias, (gh, gw), act).contiguous()


@_dwconv_op.register_fake
def _(x, nbr, keep_idx, weight, bias, gh, gw, act):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastvit::sparse_dwconv3x3_backward", mutates_args=())
def _dwconv_backward_op(grad: torch.Tensor, x: torch.Tensor, nbr: torch.Tensor, keep_idx: torch.Tensor,
                        weight: torch.Tensor, bias: Optional[torch.Tensor], gh: int, gw: int, act: bool,
                        need_x: bool, need_w: bool, need_b: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(x) and x.dtype in FUSED_DTYPES:
        from .sparse_dwconv import dwconv_backward

        return dwconv_backward(grad, x, nbr, weight, bias, act, need_x, need_w, need_b)
    return locality.reference_backward(grad, x, keep_idx, weight, bias, (gh, gw), act, need_x, need_w, need_b)


@_dwconv_backward_op.register_fake
def _(grad, x, nbr, keep_idx, weight, bias, gh, gw, act, need_x, need_w, need_b):
    has_b = need_b and bias is not None
    return (x.new_empty(x.shape if need_x else (0,)), weight.new_empty(weight.shape if need_w else (0,)),
            x.new_empty(bias.shape if has_b else (0,), dtype=bias.dtype if has_b else x.dtype))


def _dwconv_setup_context(ctx, inputs, output):
    x, nbr, keep_idx, weight, bias, gh, gw, act = inputs
    ctx.save_for_backward(x, nbr, keep_idx, weight, bias)   # z is recomputed in the backward, not saved
    ctx.grid_act = (gh, gw, act)


def _dwconv_backward(ctx, grad):
    x, nbr, keep_idx, weight, bias = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    dx, dw, db = torch.ops.fastvit.sparse_dwconv3x3_backward(grad, x, nbr, keep_idx, weight, bias,
                                                             *ctx.grid_act, need_x, need_w, need_b)
    return (dx if need_x else None, None, None, dw if need_w else None,
            db if need_b and bias is not None else None, None, None, None)


_dwconv_op.register_autograd(_dwconv_backward, setup_context=_dwconv_setup_context)


def sparse_local_dwconv(x: torch.Tensor, nbr: torch.Tensor, keep_idx: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None, grid_hw: tuple[int, int], act: bool = False) -> torch.Tensor:
    """Depthwise 3x3 conv over the kept tokens, then Hardswish if `act` (see fastvit.kernels.locality).

    x (B,K,C) kept tokens in keep_idx order (channels contiguous; any batch/token strides); nbr (B,K,9)
    from `build_neighbours(keep_idx, grid_hw)`; weight (C,1,3,3); bias (C,) or None. Weight and bias
    are cast to x's dtype (as autocast's conv does); the kernel multiplies and sums in fp32 and rounds
    once. Returns (B,K,C) in x.dtype; grads for x, weight, bias. The Triton kernels run where
    `use_triton` says (CUDA; CPU under TRITON_INTERPRET=1), the scatter->conv->gather reference otherwise.
    """
    if x.dim() != 3 or weight.shape != (x.shape[2], 1, 3, 3):
        raise ValueError(f"need x (B,K,C) and weight (C,1,3,3), got {tuple(x.shape)}, {tuple(weight.shape)}")
    if nbr.shape != (*x.shape[:2], 9) or keep_idx.shape != x.shape[:2]:
        raise ValueError(f"nbr must be (B,K,9) and keep_idx (B,K) for x {tuple(x.shape)}, "
                         f"got {tuple(nbr.shape)}, {tuple(keep_idx.shape)}")
    w = weight.to(x.dtype).contiguous()
    b = bias.to(x.dtype) if bias is not None else None
    return torch.ops.fastvit.sparse_dwconv3x3(x, nbr, keep_idx, w, b, int(grid_hw[0]), int(grid_hw[1]), act)
