"""sparse_local_dwconv (the locality conv over kept tokens, Triton) against the scatter -> conv -> gather
reference, forward and both gradients; the neighbour table; op registration; the model with the kernel.

Kernel-path tests take `kernel_device` (conftest): the compiled kernels on a GPU when there is one, else
the Triton interpreter on CPU (TRITON_INTERPRET=1, set by the fixture for the test): small grids, channel counts around the
interpreter's 32-channel / 16-token tiles (so partial tiles and several tiles per axis both occur).
The oracle is autograd through `fastvit.kernels.locality.reference_forward`, outside any custom op.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from fastvit.kernels import build_neighbours, sample_keep_indices, sparse_local_dwconv, use_triton
from fastvit.kernels import locality


@dataclass
class Case:
    grid: tuple[int, int]
    keep: str              # "one" | "all" (grid order) | "perm" (all, shuffled) | "random" | "block" | "checker" | "row"
    C: int
    dtype: torch.dtype = torch.float32
    act: bool = True
    bias: bool = True
    B: int = 2

    @property
    def id(self) -> str:
        return "-".join([f"{self.grid[0]}x{self.grid[1]}", self.keep, f"C{self.C}", str(self.dtype)[6:]]
                        + [n for n, on in (("noact", not self.act), ("nobias", not self.bias)) if on])


def keep_indices(case: Case, g: torch.Generator) -> torch.Tensor:
    gh, gw = case.grid
    N = gh * gw
    cells = torch.arange(N).view(gh, gw)
    B = case.B
    if case.keep == "one":
        return torch.randint(0, N, (B, 1), generator=g)
    if case.keep == "all":
        return torch.arange(N).expand(B, N).clone()
    if case.keep == "perm":
        return torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    if case.keep == "random":
        return sample_keep_indices(B, N, N // 2, generator=g)
    if case.keep == "block":       # a rectangle inside the grid: interior tokens have all 8 neighbours
        return cells[1:gh - 1, 2:gw - 1].reshape(1, -1).expand(B, -1).clone()
    if case.keep == "checker":     # no two kept tokens are 4-neighbours: only diagonal taps hit
        ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        return cells[(ys + xs) % 2 == 0].reshape(1, -1).expand(B, -1).clone()
    if case.keep == "row":         # one grid row: only the left/right taps hit
        return cells[gh // 2].reshape(1, -1).expand(B, -1).clone()
    raise ValueError(case.keep)


CASES = [
    Case((7, 7), "random", 20),
    Case((7, 7), "one", 16, act=False),
    Case((7, 7), "perm", 40, torch.bfloat16),
    Case((7, 7), "checker", 17, bias=False),
    Case((14, 14), "random", 24, torch.bfloat16),
    Case((14, 14), "block", 20),
    Case((14, 14), "checker", 16, torch.bfloat16, act=False),
    Case((4, 6), "row", 40, act=False),
    Case((4, 6), "all", 16, torch.bfloat16),
    Case((4, 6), "block", 3, torch.bfloat16, bias=False),
    Case((4, 6), "random", 33),
    Case((4, 6), "one", 5, torch.bfloat16),
]


def make_inputs(case: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keep_idx = keep_indices(case, g)
    B, K = keep_idx.shape
    # fp32: |z| up to ~6, all three Hardswish pieces. bf16: |z| < 3, away from hardswish' jumps at +-3,
    # where the CPU reference's bf16 conv (rounded differently from fp32 sums) takes the other branch
    # for a few elements and changes dx by half of dy there: a property of bf16, not of the kernel.
    x = (torch.randn(B, K, case.C, generator=g) * (2 if case.dtype == torch.float32 else 0.5)).to(case.dtype)
    w = torch.randn(case.C, 1, 3, 3, generator=g) / 3
    b = torch.randn(case.C, generator=g) if case.bias else None
    grad = torch.randn(B, K, case.C, generator=g).to(case.dtype)
    return x, keep_idx, w, b, grad


def tolerances(dtype):
    # bf16: identical rounded inputs, fp32 sums in a different order, then one rounding (the reference
    # rounds twice: the conv output, then the Hardswish)
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


def forward_backward(fn, x, keep_idx, w, b, grad):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(leaves[0], keep_idx, *leaves[1:])
    y.backward(grad)
    return y.detach(), *[t.grad if t is not None else None for t in leaves]


def check_against_reference(case: Case, x, keep_idx, w, b, grad):
    grid = case.grid
    nbr = build_neighbours(keep_idx, grid)

    def op(x, keep_idx, w, b):
        return sparse_local_dwconv(x, nbr, keep_idx, w, b, grid, act=case.act)

    def ref(x, keep_idx, w, b):   # weight and bias in x's dtype, as the op casts them
        return locality.reference_forward(x, keep_idx, w.to(x.dtype), b.to(x.dtype) if b is not None else None,
                                          grid, case.act)

    out, *grads = forward_backward(op, x, keep_idx, w, b, grad)
    ref_out, *ref_grads = forward_backward(ref, x, keep_idx, w, b, grad)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    tol = tolerances(case.dtype)
    torch.testing.assert_close(out.double(), ref_out.double(), **tol)
    for name, gr, rr in zip(("x", "weight", "bias"), grads, ref_grads):
        if rr is None:
            assert gr is None, name
            continue
        assert gr.dtype == rr.dtype and gr.shape == rr.shape, name
        scale = rr.double().abs().max().clamp(min=1.0)     # weight/bias grads are sums over tokens
        torch.testing.assert_close(gr.double() / scale, rr.double() / scale, msg=lambda s, name=name: f"grad of {name}: {s}", **tol)


def _on(dev, tensors):
    return [t.to(dev) if t is not None else None for t in tensors]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_matches_reference(case, kernel_device):
    assert use_triton(torch.empty(0, device=kernel_device))        # the kernel, never reference vs reference
    check_against_reference(case, *_on(kernel_device, make_inputs(case)))


def test_strided_tokens_after_a_prefix(kernel_device):
    """The MLP passes h[:, P:] (a strided view past the class token): no copy needed, same result."""
    case = Case((7, 7), "random", 24)
    x, keep_idx, w, b, grad = _on(kernel_device, make_inputs(case))
    with_prefix = torch.cat([torch.randn(x.shape[0], 1, case.C, device=kernel_device), x], dim=1)
    view = with_prefix[:, 1:]
    assert not view.is_contiguous()
    check_against_reference(case, view, keep_idx, w, b, grad)


def test_reference_backward_of_the_op_matches_autograd(monkeypatch):
    """Without the interpreter the op runs the reference and its hand-written backward."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not use_triton(torch.empty(0))
    for case in (Case((4, 6), "random", 5), Case((7, 7), "checker", 3, bias=False, act=False),
                 Case((4, 6), "block", 4, torch.bfloat16)):
        check_against_reference(case, *make_inputs(case))


def test_neighbour_table_is_the_kept_3x3_neighbourhood():
    gh, gw = 4, 6
    g = torch.Generator().manual_seed(1)
    keep_idx = torch.stack([torch.randperm(gh * gw, generator=g)[:11] for _ in range(3)])   # unsorted
    nbr = build_neighbours(keep_idx, (gh, gw))
    assert nbr.shape == (3, 11, 9) and nbr.dtype == torch.int32
    for b in range(3):
        pos = {int(n): j for j, n in enumerate(keep_idx[b])}
        for j, n in enumerate(keep_idx[b].tolist()):
            gy, gx = divmod(n, gw)
            for t in range(9):
                y, x = gy + t // 3 - 1, gx + t % 3 - 1
                inside = 0 <= y < gh and 0 <= x < gw
                assert nbr[b, j, t] == (pos.get(y * gw + x, -1) if inside else -1), (b, j, t)
    # the centre tap is the token itself; the relation is symmetric (mirrored taps), which dx relies on
    assert torch.equal(nbr[..., 4], torch.arange(11, dtype=torch.int32).expand(3, 11))
    for t in range(9):
        has = nbr[..., t] >= 0
        back = torch.gather(nbr[..., 8 - t], 1, nbr[..., t].clamp(min=0).long())
        assert torch.equal(back[has], torch.arange(11, dtype=torch.int32).expand(3, 11)[has])


def test_empty_and_single_token_batches(kernel_device):
    dev = kernel_device
    w, b = torch.randn(8, 1, 3, 3, device=dev), torch.randn(8, device=dev)
    x = torch.randn(0, 4, 8, device=dev)
    keep_idx = torch.zeros(0, 4, dtype=torch.long, device=dev)
    assert sparse_local_dwconv(x, build_neighbours(keep_idx, (3, 3)), keep_idx, w, b, (3, 3)).shape == (0, 4, 8)
    x1 = torch.randn(1, 1, 8, device=dev)
    k1 = torch.tensor([[4]], device=dev)
    y = sparse_local_dwconv(x1, build_neighbours(k1, (3, 3)), k1, w, b, (3, 3))
    torch.testing.assert_close(y, x1 * w[:, 0, 1, 1] + b)    # alone: only the centre tap


def test_bad_shapes_raise():
    x, keep_idx = torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.long)
    nbr = build_neighbours(keep_idx, (2, 2))
    with pytest.raises(ValueError, match="weight"):
        sparse_local_dwconv(x, nbr, keep_idx, torch.randn(8, 1, 5, 5), None, (2, 2))
    with pytest.raises(ValueError, match="nbr must be"):
        sparse_local_dwconv(x, nbr[:, :2], keep_idx, torch.randn(8, 1, 3, 3), None, (2, 2))


def _op_args(case: Case, dev: str = "cpu"):
    x, keep_idx, w, b, grad = _on(dev, make_inputs(case))
    nbr = build_neighbours(keep_idx, case.grid)
    return x, nbr, keep_idx, w, b, grad


def test_opcheck_registration(kernel_device):
    """schema, fake kernels (shapes and strides), autograd registration, AOT dispatch with dynamic
    shapes, forward and backward ops."""
    x, nbr, keep_idx, w, b, grad = _op_args(Case((4, 6), "random", 20), kernel_device)
    gh, gw = 4, 6
    torch.library.opcheck(torch.ops.fastvit.sparse_dwconv3x3.default,
                          (x.requires_grad_(), nbr, keep_idx, w.requires_grad_(), b.requires_grad_(), gh, gw, True))
    for needs in ((True, True, True), (True, False, False), (False, True, False)):
        torch.library.opcheck(torch.ops.fastvit.sparse_dwconv3x3_backward.default,
                              (grad, x.detach(), nbr, keep_idx, w.detach(), b.detach(), gh, gw, True, *needs))
    torch.library.opcheck(torch.ops.fastvit.sparse_dwconv3x3_backward.default,
                          (grad, x.detach(), nbr, keep_idx, w.detach(), None, gh, gw, False, True, True, True))


class _TinyLocal(torch.nn.Module):
    def __init__(self, C=16):
        super().__init__()
        self.conv = torch.nn.Conv2d(C, C, 3, padding=1, groups=C)

    def forward(self, x, keep_idx):
        nbr = build_neighbours(keep_idx, (4, 6))
        return sparse_local_dwconv(x, nbr, keep_idx, self.conv.weight, self.conv.bias, (4, 6), act=True).square().sum()


def test_torch_compile_fullgraph_traces_the_op(check_fullgraph_op, kernel_device):
    x, keep_idx, *_ = _on(kernel_device, make_inputs(Case((4, 6), "random", 16)))
    x.requires_grad_()
    check_fullgraph_op(_TinyLocal().to(kernel_device), (x, keep_idx), "sparse_dwconv3x3", leaves=[x])


# ------------------------------------------------------------------------------------------- the model
def _model(**kw):
    from fastvit.models import create_model

    torch.manual_seed(0)
    return create_model("vit_tiny_local", **{**dict(num_classes=7, depth=2, embed_dim=32, num_heads=2), **kw}).train()


def _logits_and_grads(m, x, keep_idx, autocast=False):
    m.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = m(x, keep_idx=keep_idx)
    out.float().square().sum().backward()
    return out.detach().float(), {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("class_token, autocast", [(False, False), (True, False), (True, True)])
def test_model_with_kernel_equals_model_with_reference(monkeypatch, kernel_device, class_token, autocast):
    dev = kernel_device
    kw = dict(class_token=class_token, head="token" if class_token else "gap")
    m = _model(**kw).to(dev)
    x = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8).to(dev)             # 4x6 grid
    keep_idx = sample_keep_indices(2, 24, 12, generator=torch.Generator().manual_seed(3)).to(dev)
    import fastvit.models.layers as layers

    calls, real = [], layers.sparse_local_dwconv
    monkeypatch.setattr(layers, "sparse_local_dwconv", lambda *a, **k: calls.append(1) or real(*a, **k))
    out, grads = _logits_and_grads(m, x, keep_idx, autocast)
    assert len(calls) == 2                                                           # one kernel per block
    if dev == "cpu":       # the fixture turned the interpreter on: off, the same model takes the reference
        monkeypatch.delenv("TRITON_INTERPRET")
        ref_model = m
    else:                  # a CUDA tensor always takes the kernel: the reference is the scatter->conv->gather model
        ref_model = _model(**kw, sparse_locality=False).to(dev)
        ref_model.load_state_dict(m.state_dict())
    ref, ref_grads = _logits_and_grads(ref_model, x, keep_idx, autocast)
    assert len(calls) == 2                                                           # reference: no kernel
    tol = dict(rtol=1e-4, atol=1e-5) if not autocast else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(out, ref, **tol)
    for n in ref_grads:
        scale = ref_grads[n].abs().max().clamp(min=1e-3)
        torch.testing.assert_close(grads[n] / scale, ref_grads[n] / scale, msg=lambda s, n=n: f"{n}: {s}", **tol)


def test_model_builds_one_neighbour_table_per_forward_and_none_at_keep_1(monkeypatch, kernel_device):
    import fastvit.kernels.reference as reference
    import fastvit.models.vit as vit

    built, scattered = [], []
    real_build, real_scatter = vit.build_neighbours, reference.scatter_to_grid
    monkeypatch.setattr(vit, "build_neighbours", lambda *a: built.append(1) or real_build(*a))
    monkeypatch.setattr(reference, "scatter_to_grid", lambda *a: scattered.append(1) or real_scatter(*a))
    m = _model(depth=3).to(kernel_device)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8).to(kernel_device)
    m(x, keep_rate=0.5).sum().backward()
    assert (len(built), len(scattered)) == (1, 0)           # three blocks, one table, no scatter
    m(x, keep_rate=1.0).sum().backward()
    m(x).sum().backward()
    assert (len(built), len(scattered)) == (1, 0)           # keep 1: the plain dense conv
    m2 = _model(depth=3, sparse_locality=False).to(kernel_device)
    m2(x, keep_rate=0.5)
    assert (len(built), len(scattered)) == (1, 3)           # opted out: scatter -> conv -> gather per block


# ------------------------------------------------------------------------- GPU codegen without a GPU
_AOT_SCRIPT = r'''
import os
os.environ.pop("TRITON_INTERPRET", None)
from fastvit.kernels import sparse_dwconv as sd
from fastvit.kernels.aot import compile_ptx

BT, BC, WARPS = sd.GPU_BLOCKS
B, K, C = 256, 98, 1536                                 # ViT-S MLP hidden, keep 0.5 at 224
ints = dict(M=B * K, K_KEEP=K, C=C, s_xb=K * C, s_xk=C, s_nb=K * 9, s_nk=9)

def ptx(fn, ptrs, **consts):
    return compile_ptx(fn, ptrs, ints, dict(consts, BLOCK_T=BT, BLOCK_C=BC), num_warps=WARPS)

bf = dict(x_ptr="bf16", nbr_ptr="i32", w_ptr="bf16", b_ptr="bf16", y_ptr="bf16", dy_ptr="bf16",
          dz_ptr="bf16", dw_ptr="fp32", dx_ptr="bf16")
out = {"fwd": ptx(sd._dw_fwd_kernel, bf, HAS_BIAS=True, ACT=True, RTNE_BITS=False),
       "bwd_w": ptx(sd._dw_bwd_w_kernel, bf, HAS_BIAS=True, ACT=True, STORE_DZ=True, NEED_W=True,
                    RTNE_BITS=False),
       "bwd_x": ptx(sd._dw_bwd_x_kernel, bf, RTNE_BITS=False)}
for name, text in out.items():
    # gathered token rows: 16-byte vector loads of contiguous channels
    print(name, text.count("ld.global.v4") + text.count("ld.global.nc.v4"), text.count("red.global") + text.count("atom.global"))
'''


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_a_gpu(ptx_counts):
    """Triton's CUDA backend lowers the three kernels to sm_90 PTX here (no GPU needed), with 16-byte
    vector loads of the gathered channel rows."""
    counts = ptx_counts(_AOT_SCRIPT)
    assert set(counts) == {"fwd", "bwd_w", "bwd_x"}, counts
    for name, (vec_loads, _) in counts.items():
        assert vec_loads > 0, (name, counts)
    assert counts["bwd_w"][1] > 0, counts            # dW/dBias: fp32 reductions into global memory
