"""Fused Triton kernels: uint8/float image batch -> kept patch tokens, and their backward.

Forward (one GEMM whose A operand is never materialized):

    A[m, k]   = (images[b, c, gy*p + py, gx*p + px] - mean[c]) / std[c]     # built in registers
                with m = b*K + j, (gy, gx) = divmod(keep_idx[b, j], W/p), k = c*p*p + py*p + px
    out[m, n] = sum_k A[m, k] * weight[n, k] + bias[n] + pos_embed[keep_idx[b, j], n]

    M = B*K tokens, N = D channels, K_DIM = 3*p*p. A and W are cast to the compute dtype (bf16/fp16/
    fp32) before `tl.dot`; accumulation, bias and pos_embed are fp32; one rounding at the store.

Why normalize in registers instead of folding it into the weights (W' = W/std, b' = b - W.mean/std):
the fold needs a per-call rescaled copy of W (and its inverse in the backward), and in bf16 it
multiplies raw 0..255 pixels by W/std, which loses more bits than multiplying normalized pixels.
The in-register FMA per A element is free next to the gathered load, and the backward reuses the very
same A tile code, so forward and backward see identical patches.

Backward (one kernel, recomputing A from the image instead of saving the (M, K_DIM) patches):

    dW[n, k]        = sum_m dY[m, n] * A[m, k]           # split over M, fp32 atomics into dW
    dPos[idx[m], n] += dY[m, n]                          # fp32 atomics: duplicated indices add up
    dBias[n]        = sum_m dY[m, n] = sum_i dPos[i, n]  # so the caller reduces dPos, no 3rd pass

Atomics make the fp32 summation order (hence the last bits of dW/dPos) run-to-run nondeterministic.

Block sizes: on CUDA `triton.autotune` picks among a few GEMM tilings per (D, K_DIM, M bucket, dtypes);
FASTVIT_AUTOTUNE=0 skips the search and uses the first tiling of each table (quick start-up, e.g. in
tests). Under TRITON_INTERPRET=1 (CPU tests) one small fixed tiling keeps the interpreter fast.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _token_rows(idx_ptr, offs_m, M, K_KEEP, GW, s_kb, s_kk, s_ib, s_ih, s_iw, P: tl.constexpr):
    """Tokens offs_m (BLOCK_M,) -> (mask, patch index, image offset of the patch's top-left pixel)."""
    m_mask = offs_m < M
    b = offs_m // K_KEEP
    j = offs_m % K_KEEP
    idx = tl.load(idx_ptr + b.to(tl.int64) * s_kb + j * s_kk, mask=m_mask, other=0)
    gy = idx // GW
    gx = idx % GW
    row_off = b.to(tl.int64) * s_ib + (gy * P).to(tl.int64) * s_ih + (gx * P).to(tl.int64) * s_iw
    return m_mask, idx, row_off


@triton.jit
def _patch_tile(img_ptr, row_off, m_mask, offs_k, K_DIM, s_ic, s_ih, s_iw,
                inv0, inv1, inv2, sh0, sh1, sh2, P: tl.constexpr):
    """(BLOCK_M, BLOCK_K) fp32 tile of normalized patch pixels, columns in weight's (c, py, px) order.

    Out-of-range rows/columns hold `shift` (finite) rather than 0: the other GEMM operand (W, masked
    to 0 past K_DIM; dY, masked to 0 past M) cancels them, so no extra select is needed.
    """
    c = offs_k // (P * P)
    r = offs_k % (P * P)
    col_off = c * s_ic + (r // P) * s_ih + (r % P) * s_iw                       # (BLOCK_K,)
    k_mask = offs_k < K_DIM
    mask = m_mask[:, None] & k_mask[None, :]
    x = tl.load(img_ptr + row_off[:, None] + col_off[None, :], mask=mask, other=0).to(tl.float32)
    scale = tl.where(c == 0, inv0, tl.where(c == 1, inv1, inv2))                # 1/std[c]
    shift = tl.where(c == 0, sh0, tl.where(c == 1, sh1, sh2))                   # -mean[c]/std[c]
    return x * scale[None, :] + shift[None, :]


@triton.jit
def _embed_fwd_kernel(img_ptr, idx_ptr, w_ptr, bias_ptr, pos_ptr, out_ptr,
                      M, K_KEEP, D, K_DIM, GW, M_BUCKET,
                      s_ib, s_ic, s_ih, s_iw, s_kb, s_kk,
                      s_wd, s_wc, s_wy, s_wx, s_pn, s_pd,
                      inv0, inv1, inv2, sh0, sh1, sh2,
                      P: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      EMULATE_DOT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # M_BUCKET (next pow2 of M) is only read by the autotuner, as part of its key.
    # axis 0 = D tiles (fastest), so the programs sharing one block of tokens run together and
    # the gathered image bytes are read from HBM once and from L2 for the other D tiles.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < D
    m_mask, idx, row_off = _token_rows(idx_ptr, offs_m, M, K_KEEP, GW, s_kb, s_kk, s_ib, s_ih, s_iw, P)
    cdtype = out_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_DIM, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = _patch_tile(img_ptr, row_off, m_mask, offs_k, K_DIM, s_ic, s_ih, s_iw,
                        inv0, inv1, inv2, sh0, sh1, sh2, P).to(cdtype)           # (BM, BK)
        c = offs_k // (P * P)
        r = offs_k % (P * P)
        w_col = c * s_wc + (r // P) * s_wy + (r % P) * s_wx
        w = tl.load(w_ptr + offs_n[None, :] * s_wd + w_col[:, None],
                    mask=(offs_k < K_DIM)[:, None] & n_mask[None, :], other=0.0).to(cdtype)  # (BK, BN)
        if EMULATE_DOT:  # interpreter: same rounding, fp32 matmul (see _emulate_dot)
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    # epilogue in fp32: + pos_embed[keep_idx] (+ bias), one rounding at the store
    mask = m_mask[:, None] & n_mask[None, :]
    pos = tl.load(pos_ptr + idx.to(tl.int64)[:, None] * s_pn + offs_n[None, :] * s_pd, mask=mask, other=0.0)
    acc += pos.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_off = offs_m.to(tl.int64)[:, None] * D + offs_n[None, :]
    tl.store(out_ptr + out_off, acc.to(cdtype), mask=mask)


@triton.jit
def _embed_bwd_kernel(img_ptr, idx_ptr, dy_ptr, dw_ptr, dpos_ptr,
                      M, K_KEEP, D, K_DIM, GW, M_BUCKET,
                      s_ib, s_ic, s_ih, s_iw, s_kb, s_kk, s_yb, s_yk, s_yd,
                      inv0, inv1, inv2, sh0, sh1, sh2,
                      P: tl.constexpr, NEED_W: tl.constexpr, NEED_POS: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, EMULATE_DOT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # grid (D tiles, K_DIM tiles, splits of M). dw (D, K_DIM) and dpos (N, D) are fp32, zeroed.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_split = tl.num_programs(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < D
    cdtype = dy_ptr.dtype.element_ty
    # this program's share of the M tiles: [t_lo, t_hi)
    m_tiles = tl.cdiv(M, BLOCK_M)
    per_split = tl.cdiv(m_tiles, n_split)
    t_lo = pid_s * per_split
    t_hi = tl.minimum(t_lo + per_split, m_tiles)

    # acc holds dW^T: the recomputed patch tile (registers) is the left operand and dY, loaded straight
    # from memory, the right one, so the compiler can stream dY through shared memory asynchronously
    # (with dW = dY^T A instead, both operands would have to round-trip through shared memory).
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for t in range(t_lo, t_hi):
        offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask, idx, row_off = _token_rows(idx_ptr, offs_m, M, K_KEEP, GW, s_kb, s_kk, s_ib, s_ih, s_iw, P)
        b = offs_m // K_KEEP
        j = offs_m % K_KEEP
        mask = m_mask[:, None] & n_mask[None, :]
        dy_off = b.to(tl.int64)[:, None] * s_yb + (j * s_yk)[:, None] + offs_n[None, :] * s_yd
        dy = tl.load(dy_ptr + dy_off, mask=mask, other=0.0)                          # (BM, BN)
        if NEED_W:
            a = _patch_tile(img_ptr, row_off, m_mask, offs_k, K_DIM, s_ic, s_ih, s_iw,
                            inv0, inv1, inv2, sh0, sh1, sh2, P).to(cdtype)            # (BM, BK)
            if EMULATE_DOT:
                acc = tl.dot(tl.trans(a.to(tl.float32)), dy.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.trans(a), dy, acc, input_precision=DOT_PRECISION)     # (BK, BN)
        if NEED_POS:
            if pid_k == 0:  # one K_DIM tile per D tile scatters dY into dpos
                # every element is its own atomic, so repeated patch indices accumulate correctly
                tl.atomic_add(dpos_ptr + idx.to(tl.int64)[:, None] * D + offs_n[None, :],
                              dy.to(tl.float32), mask=mask, sem="relaxed")
    if NEED_W:
        w_mask = (offs_k < K_DIM)[:, None] & n_mask[None, :]
        tl.atomic_add(dw_ptr + offs_n.to(tl.int64)[None, :] * K_DIM + offs_k[:, None], acc, mask=w_mask,
                      sem="relaxed")  # plain sums: no ordering needed


# ----------------------------------------------------------------------------------------------
# launch helpers
# ----------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _emulate_dot(dtype: torch.dtype) -> bool:
    # Triton 3.x's interpreter multiplies bf16 operands as their raw uint16 bits (np.matmul on the
    # storage dtype). Under the interpreter we therefore round the operands to bf16/fp16 as the GPU
    # would and multiply the rounded values in fp32: same products, the interpreter's bug avoided.
    return _interpreting() and dtype != torch.float32


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): standard Hopper/Ampere bf16 GEMM tilings.
_FWD_CONFIGS = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                (128, 128, 32, 4, 4), (64, 64, 64, 4, 4), (256, 128, 64, 8, 3)]
_BWD_CONFIGS = [(64, 128, 128, 8, 3), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3),
                (64, 64, 128, 4, 4), (32, 128, 128, 4, 4), (64, 64, 64, 4, 4)]
# One small tiling for the interpreter: several tiles per dimension even at test sizes.
_INTERP_BLOCKS = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64)


# Tests set this to {"fwd": row, "bwd": row} to run one specific tiling of the tables above.
_FORCED: dict | None = None


def _fixed_config(kind: str) -> dict | None:
    """Launch kwargs of the tiling to use without autotuning, or None to autotune."""
    if _FORCED is not None:
        row = _FORCED[kind]
    elif os.environ.get("FASTVIT_AUTOTUNE", "1") == "0":
        row = (_FWD_CONFIGS if kind == "fwd" else _BWD_CONFIGS)[0]
    else:
        return None
    m, n, k, warps, stages = row
    return dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=warps, num_stages=stages)


def _cfgs(table):
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s)
            for m, n, k, w, s in table]


@functools.cache
def _tuned_fwd():
    return triton.autotune(_cfgs(_FWD_CONFIGS), key=["D", "K_DIM", "M_BUCKET", "HAS_BIAS"])(_embed_fwd_kernel)


@functools.cache
def _tuned_bwd():
    # the kernel accumulates with atomics: autotuning reruns it, so zero the outputs before each try
    return triton.autotune(_cfgs(_BWD_CONFIGS), key=["D", "K_DIM", "M_BUCKET", "NEED_W", "NEED_POS"],
                           reset_to_zero=["dw_ptr", "dpos_ptr"])(_embed_bwd_kernel)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _norm_consts(mean, std) -> tuple[float, ...]:
    inv = [1.0 / float(s) for s in std]
    return (*inv, *[-float(m) * i for m, i in zip(mean, inv)])


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 requested means fp32 products ("ieee"), not TF32; bf16/fp16 ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


def _m_bucket(M: int) -> int:
    return triton.next_power_of_2(max(M, 1))


def embed_forward(images: torch.Tensor, keep_idx: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None, pos_embed: torch.Tensor, mean, std,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """(B,3,H,W), (B,K) -> (B,K,D) in out_dtype. Inputs already validated; any strides work."""
    B, _, H, W = images.shape
    K = keep_idx.shape[1]
    D, _, P, _ = weight.shape
    M, K_DIM, GW = B * K, 3 * P * P, W // P
    out = torch.empty((B, K, D), dtype=out_dtype, device=images.device)
    if M == 0 or D == 0:
        return out
    # Cast W (D x 3pp, tiny) to the compute dtype once instead of in every program's k-loop: its
    # tiles then go straight from memory to the MMA's shared-memory operand (fp32 params under
    # autocast would otherwise be converted through registers 12x per token block).
    w = weight if weight.dtype == out_dtype else weight.to(out_dtype)
    args = (images, keep_idx, w, bias if bias is not None else pos_embed, pos_embed, out,
            M, K, D, K_DIM, GW, _m_bucket(M),
            *images.stride(), *keep_idx.stride(), *w.stride(), *pos_embed.stride(),
            *_norm_consts(mean, std))
    meta = dict(P=P, HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(out_dtype),
                EMULATE_DOT=_emulate_dot(out_dtype))

    def grid(META):
        return (triton.cdiv(D, META["BLOCK_N"]), triton.cdiv(M, META["BLOCK_M"]))

    if _interpreting():
        _embed_fwd_kernel[grid](*args, **meta, **_INTERP_BLOCKS)
    else:
        fixed = _fixed_config("fwd")
        with torch.cuda.device(images.device):
            if fixed is None:
                _tuned_fwd()[grid](*args, **meta)
            else:
                _embed_fwd_kernel[grid](*args, **meta, **fixed)
    return out


def embed_backward(grad: torch.Tensor, images: torch.Tensor, keep_idx: torch.Tensor,
                   weight: torch.Tensor, pos_embed: torch.Tensor, mean, std,
                   need_weight: bool, need_pos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """grad (B,K,D) -> (dW (D,3,p,p) in weight.dtype or empty, dPos (N,D) fp32 or empty).

    dBias is dPos.sum(0) (each token adds to exactly one pos_embed row); the caller does that.
    """
    B, _, H, W = images.shape
    K = keep_idx.shape[1]
    D, _, P, _ = weight.shape
    M, K_DIM, GW, N = B * K, 3 * P * P, W // P, pos_embed.shape[0]
    dw = torch.zeros((D, K_DIM) if need_weight else (0,), dtype=torch.float32, device=images.device)
    dpos = torch.zeros((N, D) if need_pos else (0,), dtype=torch.float32, device=images.device)
    if M > 0 and D > 0 and (need_weight or need_pos):
        args = (images, keep_idx, grad, dw, dpos,
                M, K, D, K_DIM, GW, _m_bucket(M),
                *images.stride(), *keep_idx.stride(), *grad.stride(),
                *_norm_consts(mean, std))
        meta = dict(P=P, NEED_W=need_weight, NEED_POS=need_pos, DOT_PRECISION=_dot_precision(grad.dtype),
                    EMULATE_DOT=_emulate_dot(grad.dtype))
        if _interpreting():
            # two splits of M so the tests exercise the cross-program atomic reduction
            def grid(META):
                k_tiles = triton.cdiv(K_DIM, META["BLOCK_K"]) if need_weight else 1
                return (triton.cdiv(D, META["BLOCK_N"]), k_tiles, min(2, triton.cdiv(M, META["BLOCK_M"])))

            _embed_bwd_kernel[grid](*args, **meta, **_INTERP_BLOCKS)
        else:
            sms = _sm_count(images.device.index if images.device.index is not None else torch.cuda.current_device())

            def grid(META):
                # split M until there are ~2 programs per SM: the (D x K_DIM) output alone has
                # only a few dozen tiles, far too few to fill the GPU.
                n_tiles = triton.cdiv(D, META["BLOCK_N"])
                k_tiles = triton.cdiv(K_DIM, META["BLOCK_K"]) if need_weight else 1
                m_tiles = triton.cdiv(M, META["BLOCK_M"])
                return (n_tiles, k_tiles, max(1, min(m_tiles, triton.cdiv(2 * sms, n_tiles * k_tiles))))

            fixed = _fixed_config("bwd")
            with torch.cuda.device(images.device):
                if fixed is None:
                    _tuned_bwd()[grid](*args, **meta)
                else:
                    _embed_bwd_kernel[grid](*args, **meta, **fixed)
    if need_weight:
        dw = dw.view(D, 3, P, P).to(weight.dtype)
    else:
        dw = weight.new_empty((0,))
    return dw, dpos
