"""embed_kept_patches (fused Triton op) against the plain-PyTorch reference, forward and backward.

The kernel-path tests take `kernel_device` (conftest): with a GPU they run the compiled kernels on it
against the reference; without one, on CPU under the Triton interpreter, which the fixture turns on for
the test itself (TRITON_INTERPRET=1), so shapes are tiny. The `cuda` tests add the GPU-only cases (plus a
ViT-S-sized one) in fp32 and bf16.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from fastvit.kernels import embed_kept_patches, embed_kept_patches_reference, sample_keep_indices
from fastvit.kernels.ops import use_triton

IMAGENET_MEAN_U8 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_U8 = (0.229 * 255, 0.224 * 255, 0.225 * 255)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Case:
    p: int
    hw: tuple[int, int]
    B: int
    K: int                      # kept patches per image (> N only with duplicates)
    D: int = 32
    image_dtype: torch.dtype = torch.uint8
    param_dtype: torch.dtype = torch.float32
    bias: bool = True
    duplicates: bool = False
    noncontig: bool = False
    autocast: torch.dtype | None = None
    grads: tuple[bool, bool, bool] = (True, True, True)  # weight, bias, pos_embed require grad
    extra: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        bits = [f"p{self.p}", f"{self.hw[0]}x{self.hw[1]}", f"B{self.B}", f"K{self.K}", f"D{self.D}",
                str(self.image_dtype).split(".")[-1], str(self.param_dtype).split(".")[-1]]
        bits += [n for n, on in (("nobias", not self.bias), ("dup", self.duplicates),
                                 ("noncontig", self.noncontig)) if on]
        if self.autocast:
            bits.append(f"autocast-{str(self.autocast).split('.')[-1]}")
        if self.grads != (True, True, True):
            bits.append("grads" + "".join("WBP"[i] for i, g in enumerate(self.grads) if g))
        return "-".join(bits)


CPU_CASES = [
    Case(16, (32, 48), B=2, K=3),                                                  # non-square
    Case(8, (24, 16), B=1, K=1, D=48, bias=False),                                 # keep 1, D % block != 0
    Case(14, (28, 42), B=3, K=6, image_dtype=torch.float32, param_dtype=torch.bfloat16),  # keep all
    Case(8, (32, 32), B=2, K=16, autocast=torch.bfloat16),                          # square, all, autocast
    Case(8, (16, 16), B=2, K=7, duplicates=True, bias=False),                       # repeats, K > N
    Case(16, (32, 32), B=2, K=3, noncontig=True, image_dtype=torch.float16),
    Case(8, (16, 24), B=2, K=4, noncontig=True, duplicates=True, param_dtype=torch.float16),
    Case(8, (16, 16), B=2, K=3, grads=(False, True, False)),                       # frozen W and pos
    Case(8, (16, 16), B=2, K=3, grads=(True, False, False)),
]


def make_inputs(case: Case, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    H, W = case.hw
    gh, gw = H // case.p, W // case.p
    N = gh * gw
    if case.image_dtype == torch.uint8:
        images = torch.randint(0, 256, (case.B, 3, H, W), generator=g, dtype=torch.uint8)
        mean, std = IMAGENET_MEAN_U8, IMAGENET_STD_U8
    else:
        images = torch.rand((case.B, 3, H, W), generator=g).to(case.image_dtype)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if case.duplicates:
        keep_idx = torch.randint(0, N, (case.B, case.K), generator=g)
        keep_idx[:, : min(3, case.K)] = keep_idx[:, :1]      # guaranteed repeats in every row
    else:
        keep_idx = sample_keep_indices(case.B, N, case.K, "cpu", generator=g)
    weight = torch.randn(case.D, 3, case.p, case.p, generator=g) * (3 * case.p * case.p) ** -0.5
    bias = torch.randn(case.D, generator=g) if case.bias else None
    pos = torch.randn(N, case.D, generator=g) * 0.5
    grad = torch.randn(case.B, case.K, case.D, generator=g)

    images, keep_idx, grad = images.to(device), keep_idx.to(device), grad.to(device)
    weight, pos = weight.to(device, case.param_dtype), pos.to(device, case.param_dtype)
    bias = bias.to(device, case.param_dtype) if bias is not None else None
    if case.noncontig:
        # images as a crop of a wider channels-last batch, keep_idx/pos_embed column-major,
        # weight channels-last: every operand has strides the kernel must honour
        big = torch.zeros((case.B, 3, H, W + 8), dtype=images.dtype, device=device)
        big = big.contiguous(memory_format=torch.channels_last)
        big[..., 4:4 + W] = images
        images = big[..., 4:4 + W]
        keep_idx = keep_idx.t().contiguous().t()
        pos = pos.t().contiguous().t()
        weight = weight.contiguous(memory_format=torch.channels_last)
        assert not (images.is_contiguous() or keep_idx.is_contiguous() or pos.is_contiguous()
                    or weight.is_contiguous())
    return images, keep_idx, weight, bias, pos, mean, std, grad


def run(fn, case: Case, images, keep_idx, weight, bias, pos, mean, std, grad):
    """Forward + backward of fn; returns (out, grad of weight, bias, pos_embed) (None where frozen)."""
    params = [t.detach().clone().requires_grad_(rg) if t is not None else None
              for t, rg in zip((weight, bias, pos), case.grads)]
    with torch.autocast(images.device.type, dtype=case.autocast or torch.bfloat16, enabled=bool(case.autocast)):
        out = fn(images, keep_idx, params[0], params[1], params[2], mean, std)
    out.backward(grad.to(out.dtype) if not case.noncontig else grad.to(out.dtype)[:, :1].expand_as(out))
    return out, *[t.grad if t is not None else None for t in params]


def tolerances(dtype: torch.dtype) -> dict:
    # bf16/fp16: the fused GEMM and conv2d sum identical rounded products in different orders, then
    # round once: a couple of ulps of the result.
    return {torch.float64: dict(rtol=1e-10, atol=1e-10),
            torch.float32: dict(rtol=1e-4, atol=1e-4),
            torch.bfloat16: dict(rtol=2e-2, atol=3e-2),
            torch.float16: dict(rtol=3e-3, atol=3e-3)}[dtype]


def check_against_reference(case: Case, device: str):
    inputs = make_inputs(case, device)
    out, *grads = run(embed_kept_patches, case, *inputs)
    ref, *ref_grads = run(embed_kept_patches_reference, case, *inputs)
    cdtype = case.autocast or case.param_dtype
    assert out.shape == (case.B, case.K, case.D) and out.dtype == ref.dtype == cdtype
    torch.testing.assert_close(out.double(), ref.double(), **tolerances(cdtype))
    for name, g, r, rg in zip(("weight", "bias", "pos_embed"), grads, ref_grads, case.grads):
        if not rg or r is None:
            assert g is None and r is None, name
            continue
        assert g is not None and g.dtype == r.dtype and g.shape == r.shape, name
        scale = r.double().abs().max().clamp(min=1.0)
        tol = tolerances(r.dtype if r.dtype != torch.float32 else cdtype)
        torch.testing.assert_close(g.double() / scale, r.double() / scale, msg=f"grad of {name}", **tol)


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_fused_matches_reference(case, kernel_device, monkeypatch):
    monkeypatch.setenv("FASTVIT_AUTOTUNE", "0")      # small D: one tiling each (the cuda cases autotune)
    assert use_triton(torch.empty(0, device=kernel_device))      # the kernel path, never reference vs reference
    check_against_reference(case, kernel_device)


def test_reference_path_through_op_matches_autograd(monkeypatch):
    """Without the interpreter the op runs the reference math and its hand-written backward."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not use_triton(torch.empty(0))
    check_against_reference(Case(8, (16, 24), B=2, K=8, duplicates=True), "cpu")
    check_against_reference(Case(16, (32, 32), B=1, K=2, param_dtype=torch.bfloat16, bias=False), "cpu")


def test_duplicated_indices_accumulate(kernel_device):
    """Repeating one patch r times gives r identical tokens and r times its pos_embed gradient."""
    dev = kernel_device
    case = Case(8, (16, 16), B=1, K=4, bias=True)
    images, _, weight, bias, pos, mean, std, _ = make_inputs(case, dev)
    keep_idx = torch.tensor([[2, 2, 2, 1]], device=dev)
    pos = pos.clone().requires_grad_()
    bias = bias.clone().requires_grad_()
    out = embed_kept_patches(images, keep_idx, weight, bias, pos, mean, std)
    torch.testing.assert_close(out[0, 0], out[0, 1], rtol=0, atol=0)
    out.sum().backward()
    torch.testing.assert_close(pos.grad[2], torch.full((case.D,), 3.0, device=dev))
    torch.testing.assert_close(pos.grad[1], torch.full((case.D,), 1.0, device=dev))
    torch.testing.assert_close(pos.grad[[0, 3]], torch.zeros(2, case.D, device=dev))
    torch.testing.assert_close(bias.grad, torch.full((case.D,), 4.0, device=dev))


def test_images_and_indices_get_no_grad(kernel_device):
    case = Case(8, (16, 16), B=1, K=2, image_dtype=torch.float32)
    images, keep_idx, weight, bias, pos, mean, std, _ = make_inputs(case, kernel_device)
    images.requires_grad_()
    weight.requires_grad_()
    embed_kept_patches(images, keep_idx, weight, bias, pos, mean, std).sum().backward()
    assert images.grad is None and weight.grad is not None


@pytest.mark.parametrize("bad, msg", [
    (dict(hw=(20, 16)), "multiples of the patch size"),
    (dict(channels=4), r"\(B,3,H,W\)"),
    (dict(pos_n=5), "pos_embed must be"),
    (dict(idx_dtype=torch.float32), "keep_idx must be int32 or int64"),
    (dict(bias_d=7), "bias must be"),
    (dict(mean=(1.0, 2.0)), "mean must be 1 or 3 numbers"),
])
def test_unsupported_inputs_raise_one_clear_error(bad, msg):
    H, W = bad.get("hw", (16, 16))
    images = torch.zeros(1, bad.get("channels", 3), H, W, dtype=torch.uint8)
    weight = torch.zeros(8, 3, 8, 8)
    keep_idx = torch.zeros(1, 2, dtype=bad.get("idx_dtype", torch.int64))
    pos = torch.zeros(bad.get("pos_n", (H // 8) * (W // 8)), 8)
    bias = torch.zeros(bad.get("bias_d", 8))
    for fn in (embed_kept_patches, embed_kept_patches_reference):
        with pytest.raises(ValueError, match=msg):
            fn(images, keep_idx, weight, bias, pos, bad.get("mean", 0.0), 1.0)


def test_int32_indices_and_tensor_mean_std(kernel_device):
    case = Case(8, (16, 16), B=2, K=3)
    images, keep_idx, weight, bias, pos, mean, std, _ = make_inputs(case, kernel_device)
    ref = embed_kept_patches_reference(images, keep_idx, weight, bias, pos, mean, std)
    out = embed_kept_patches(images, keep_idx.int(), weight, bias, pos, torch.tensor(mean, device=kernel_device),
                             torch.tensor(std, device=kernel_device))
    torch.testing.assert_close(out, ref, **tolerances(torch.float32))


def test_one_keep_idx_shared_by_the_batch(kernel_device):
    """keep_idx expanded over the batch (stride 0) works without a copy."""
    case = Case(8, (16, 24), B=3, K=2)
    images, _, weight, bias, pos, mean, std, _ = make_inputs(case, kernel_device)
    keep_idx = torch.tensor([[5, 1]], device=kernel_device).expand(3, 2)
    ref = embed_kept_patches_reference(images, keep_idx, weight, bias, pos, mean, std)
    out = embed_kept_patches(images, keep_idx, weight, bias, pos, mean, std)
    torch.testing.assert_close(out, ref, **tolerances(torch.float32))


class _TinyEmbed(torch.nn.Module):
    def __init__(self, p=8, D=32, N=4):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, D, p, stride=p)
        self.pos = torch.nn.Parameter(torch.randn(N, D) * 0.02)

    def forward(self, images, keep_idx):
        tokens = embed_kept_patches(images, keep_idx, self.proj.weight, self.proj.bias, self.pos,
                                    IMAGENET_MEAN_U8, IMAGENET_STD_U8)   # (B,K,D)
        return tokens.float().mean(1).square().sum()


def test_torch_compile_fullgraph_traces_the_op(check_fullgraph_op, kernel_device):
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8).to(kernel_device)
    keep_idx = sample_keep_indices(2, 4, 3, "cpu", generator=torch.Generator().manual_seed(0)).to(kernel_device)
    check_fullgraph_op(_TinyEmbed().to(kernel_device), (images, keep_idx), "embed_kept_patches")


def test_opcheck_registration(kernel_device):
    """torch.library.opcheck: schema, fake kernels, autograd registration and AOT dispatch with
    dynamic shapes agree with the real ops (forward and backward)."""
    case = Case(8, (16, 16), B=2, K=3, duplicates=True)
    images, keep_idx, weight, bias, pos, mean, std, grad = make_inputs(case, kernel_device)
    fwd_args = (images, keep_idx, weight.requires_grad_(), bias.requires_grad_(), pos.requires_grad_(),
                list(mean), list(std), torch.float32)
    torch.library.opcheck(torch.ops.fastvit.embed_kept_patches.default, fwd_args)
    bwd_args = (grad, images, keep_idx, weight.detach(), pos.detach(), list(mean), list(std), True, True)
    torch.library.opcheck(torch.ops.fastvit.embed_kept_patches_backward.default, bwd_args)


def test_float64_params_take_the_reference_path():
    case = Case(8, (16, 16), B=2, K=3, param_dtype=torch.float64)
    check_against_reference(case, "cpu")


# ---------------------------------------------------------------------------------------------- CUDA
CUDA_CASES = CPU_CASES + [
    Case(16, (224, 224), B=8, K=98, D=384, param_dtype=torch.bfloat16),             # ViT-S/16, keep 0.5
    Case(16, (128, 128), B=4, K=64, D=384, autocast=torch.bfloat16),               # keep all
    Case(16, (224, 224), B=4, K=49, D=384),                                         # fp32
    Case(14, (224, 224), B=2, K=256, D=192, duplicates=True, param_dtype=torch.bfloat16),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: c.id)
def test_fused_matches_reference_cuda(case, kernel_device, monkeypatch):
    assert use_triton(torch.empty(0, device="cuda"))
    if case.D < 384:  # autotune only the ViT-sized cases: each tiling is a separate compile
        monkeypatch.setenv("FASTVIT_AUTOTUNE", "0")
    check_against_reference(case, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("row", range(6))
def test_every_tiling_is_correct_cuda(row, kernel_device, monkeypatch):
    """Whichever tiling the autotuner picks must be right: run each table row directly."""
    from fastvit.kernels import patch_embed

    assert len(patch_embed._FWD_CONFIGS) == len(patch_embed._BWD_CONFIGS) == 6, "update the parametrization"
    monkeypatch.setattr(patch_embed, "_FORCED", {"fwd": patch_embed._FWD_CONFIGS[row],
                                                 "bwd": patch_embed._BWD_CONFIGS[row]})
    check_against_reference(Case(16, (128, 160), B=3, K=37, D=200, duplicates=True,
                                 param_dtype=torch.bfloat16), "cuda")


@pytest.mark.cuda
def test_torch_compile_inductor_cuda():
    m = _TinyEmbed().cuda()
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, device="cuda")
    keep_idx = sample_keep_indices(2, 4, 3, "cuda")
    eager = m(images, keep_idx)
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(images, keep_idx), eager)


# ------------------------------------------------------------------------- GPU codegen without a GPU
_AOT_SCRIPT = r'''
import os
os.environ.pop("TRITON_INTERPRET", None)   # compile the real kernels, not the interpreter's
from fastvit.kernels import patch_embed as pe
from fastvit.kernels.aot import compile_ptx

def compile_sm90(fn, ptrs, ints, consts, cfg):
    bm, bn, bk, warps, stages = cfg
    return compile_ptx(fn, ptrs, ints, dict(consts, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
                       floats=("inv0", "inv1", "inv2", "sh0", "sh1", "sh2"), num_warps=warps, num_stages=stages)

B, R, K, D, P = 256, 224, 98, 384, 16          # ViT-S/16, keep 0.5, contiguous tensors
ints = dict(M=B * K, K_KEEP=K, D=D, K_DIM=3 * P * P, GW=R // P, M_BUCKET=32768, s_ib=3 * R * R,
            s_ic=R * R, s_ih=R, s_iw=1, s_kb=K, s_kk=1, s_wd=3 * P * P, s_wc=P * P, s_wy=P, s_wx=1,
            s_pn=D, s_pd=1, s_yb=K * D, s_yk=D, s_yd=1)
fwd = compile_sm90(pe._embed_fwd_kernel,
                   dict(img_ptr="u8", idx_ptr="i64", w_ptr="bf16", bias_ptr="fp32", pos_ptr="fp32", out_ptr="bf16"),
                   ints, dict(P=P, HAS_BIAS=True, DOT_PRECISION="tf32", EMULATE_DOT=False), pe._FWD_CONFIGS[0])
bwd = compile_sm90(pe._embed_bwd_kernel,
                   dict(img_ptr="u8", idx_ptr="i64", dy_ptr="bf16", dw_ptr="fp32", dpos_ptr="fp32"),
                   ints, dict(P=P, NEED_W=True, NEED_POS=True, DOT_PRECISION="tf32", EMULATE_DOT=False),
                   pe._BWD_CONFIGS[0])
for name, ptx in (("fwd", fwd), ("bwd", bwd)):
    # tensor-core MMAs, and the gathered uint8 patch rows / dY tiles streamed with async copies
    print(name, ptx.count("wgmma.mma_async"), ptx.count("cp.async.cg.shared.global"))
'''


def test_kernels_compile_for_hopper_without_a_gpu(ptx_counts):
    """Triton's CUDA backend lowers both kernels to sm_90 PTX here (no GPU needed): catches GPU-only
    compile errors the interpreter cannot see, and checks they use wgmma and async copies."""
    counts = ptx_counts(_AOT_SCRIPT)
    for name in ("fwd", "bwd"):
        wgmma, async_copies = counts[name]
        assert wgmma > 0 and async_copies > 0, (name, counts)
