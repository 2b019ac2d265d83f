"""Compile a Triton kernel for a CUDA target without a GPU (Triton's CUDA backend, ahead of time).

The tests use it to check that the kernels lower to sm_90 PTX on a machine that only has the
interpreter. Call it with TRITON_INTERPRET unset (before triton is imported), e.g. in a subprocess.
"""
from __future__ import annotations


def compile_ptx(fn, ptrs: dict, ints: dict, consts: dict, *, floats=(), num_warps: int = 4,
                num_stages: int = 3, arch: int = 90) -> str:
    """PTX of the @triton.jit `fn`, specialized like the JIT does for these argument values.

    ptrs {arg: "bf16"|"fp32"|"i32"|...} (16-byte aligned pointers); ints {arg: value} (1 becomes a
    constexpr, multiples of 16 are marked divisible); consts {arg: value} the constexpr arguments;
    floats: the fp32 scalar arguments.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = dict(consts)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name], attrs[(i,)] = "*" + ptrs[name], [["tt.divisibility", 16]]
        elif name in floats:
            sig[name] = "fp32"
        elif ints[name] == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    return k.asm["ptx"]
