"""Plain-PyTorch `embed_kept_patches`: the oracle for tests and the CPU path.

Semantics (the fused Triton kernel in `patch_embed.py` matches them):

    x      = (images - mean) / std                         # fp32, (B,3,H,W)
    tokens = conv2d(x, weight, stride=p)                   # compute dtype, fp32 accumulation
    out    = tokens[b, keep_idx[b, j]] + bias + pos_embed[keep_idx[b, j]]   # added in fp32 (fp64 if fp64)

Compute/output dtype (`compute_dtype`): the autocast dtype when autocast is on for the images'
device, else the weight's dtype. bf16/fp16 multiply with fp32 accumulation; fp32 is fp32.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def as_triple(v, name: str) -> tuple[float, float, float]:
    """mean/std given as one number, three numbers, or a 1- or 3-element tensor -> 3 python floats."""
    if isinstance(v, torch.Tensor):
        v = v.detach().flatten().tolist()  # a host sync when v lives on the GPU: pass floats there
    if isinstance(v, (int, float)):
        v = (v, v, v)
    v = tuple(float(x) for x in v)
    if len(v) == 1:
        v = v * 3
    if len(v) != 3:
        raise ValueError(f"{name} must be 1 or 3 numbers (one per RGB channel), got {len(v)}")
    return v


def compute_dtype(images: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the projection runs in and the tokens come out in (see module docstring)."""
    dev = images.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def check_inputs(images, keep_idx, weight, bias, pos_embed) -> tuple[int, int, int, int, int, int]:
    """Raise one clear ValueError for an unsupported call; return (B, K, D, p, gh, gw)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B,3,H,W), got {tuple(images.shape)}")
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
    if weight.dim() != 4 or weight.shape[1] != 3 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be (D,3,p,p) like nn.Conv2d, got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    B, _, H, W = images.shape
    D, p = weight.shape[0], weight.shape[2]
    if H % p or W % p:
        raise ValueError(f"image sides {H}x{W} must be multiples of the patch size {p}")
    gh, gw = H // p, W // p
    if keep_idx.dim() != 2 or keep_idx.shape[0] != B:
        raise ValueError(f"keep_idx must be (B={B}, K), got {tuple(keep_idx.shape)}")
    if keep_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"keep_idx must be int32 or int64, got {keep_idx.dtype}")
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"bias must be (D={D},) or None, got {tuple(bias.shape)}")
    if tuple(pos_embed.shape) != (gh * gw, D):
        raise ValueError(f"pos_embed must be (N={gh * gw}, D={D}) for a {gh}x{gw} patch grid, "
                         f"got {tuple(pos_embed.shape)}")
    for name, t in (("keep_idx", keep_idx), ("weight", weight), ("bias", bias), ("pos_embed", pos_embed)):
        if t is not None and t.device != images.device:
            raise ValueError(f"{name} is on {t.device} but images are on {images.device}")
    return B, keep_idx.shape[1], D, p, gh, gw


def embed_kept_patches_reference(images: torch.Tensor, keep_idx: torch.Tensor, weight: torch.Tensor,
                                 bias: torch.Tensor | None, pos_embed: torch.Tensor,
                                 mean: Sequence[float] | float, std: Sequence[float] | float) -> torch.Tensor:
    """(B,3,H,W) images, (B,K) keep_idx -> (B,K,D) tokens, differentiable in weight/bias/pos_embed.

    Embeds every patch then gathers (what timm/PSS do), so it is slow but obviously right.
    """
    check_inputs(images, keep_idx, weight, bias, pos_embed)
    return reference_forward(images, keep_idx, weight, bias, pos_embed,
                             as_triple(mean, "mean"), as_triple(std, "std"), compute_dtype(images, weight))


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B,3,H,W) uint8/float -> fp32 (images - mean) / std."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() - mean_t) / std_t


def reference_forward(images, keep_idx, weight, bias, pos_embed, mean, std, dtype: torch.dtype) -> torch.Tensor:
    """The reference math with the compute dtype given (mean/std already 3 floats)."""
    B, K = keep_idx.shape
    D, p = weight.shape[0], weight.shape[2]
    with torch.autocast(images.device.type, enabled=False):
        x = normalize(images, mean, std)                                         # (B,3,H,W) fp32
        tokens = F.conv2d(x.to(dtype), weight.to(dtype), stride=p)               # (B,D,gh,gw)
        tokens = tokens.flatten(2).transpose(1, 2)                               # (B,N,D)
        idx = keep_idx.long()
        kept = torch.gather(tokens, 1, idx[:, :, None].expand(B, K, D))          # (B,K,D)
        acc = grad_accum_dtype(dtype)                                            # fp32 (fp64 for fp64)
        out = kept.to(acc) + pos_embed.to(acc)[idx]                              # (B,K,D)
        if bias is not None:
            out = out + bias.to(acc)
        return out.to(dtype)


def grad_accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 gradients, fp64 for fp64: the dtype dW and dPos are summed in."""
    return torch.promote_types(dtype, torch.float32)


def reference_backward(grad, images, keep_idx, weight, pos_embed, mean, std,
                       need_weight: bool, need_pos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `patch_embed.embed_backward`, in plain PyTorch (the CPU path's backward).

    grad (B,K,D) -> (dW like weight or empty, dPos (N,D) in `grad_accum_dtype` or empty);
    dBias = dPos.sum(0).
    """
    B, K, D = grad.shape
    p = weight.shape[2]
    N = pos_embed.shape[0]
    idx = keep_idx.long()
    g = grad.reshape(B * K, D)                                                   # (M,D)
    dw = weight.new_empty((0,))
    acc = grad_accum_dtype(grad.dtype)
    dpos = torch.empty((0,), dtype=acc, device=grad.device)
    with torch.autocast(images.device.type, enabled=False):
        if need_weight:
            x = normalize(images, mean, std)                                     # (B,3,H,W)
            gh, gw = x.shape[2] // p, x.shape[3] // p
            patches = (x.view(B, 3, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
                       .reshape(B, gh * gw, 3 * p * p))                          # (B,N,3pp)
            kept = torch.gather(patches, 1, idx[:, :, None].expand(B, K, 3 * p * p))
            kept = kept.to(grad.dtype).to(acc).reshape(B * K, -1)                # (M,3pp) as the GEMM sees it
            dw = (g.to(acc).t() @ kept).view(weight.shape).to(weight.dtype)      # (D,3,p,p)
        if need_pos:
            dpos = torch.zeros((N, D), dtype=acc, device=grad.device)
            dpos.index_add_(0, idx.reshape(-1), g.to(acc))                       # duplicates add up
    return dw, dpos


# ------------------------------------------------------------------------------------------------------
# the locality MLP's depthwise conv over the patch grid (fastvit.models.layers.LocalityMlp runs it; the
# sparse Triton kernel in sparse_dwconv.py / locality.py is checked against it)

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
