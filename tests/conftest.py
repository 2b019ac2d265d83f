"""Shared fixtures and markers.

- `cuda` tests are skipped without a CUDA GPU; `realdata` tests without ../shared/data.
- `device_dependent`: a test whose code path changes when a GPU is present (it runs the GPU path there);
  every test taking `kernel_device` gets the marker here. `make gpu-check` runs `-m "cuda or
  device_dependent"` on the GPU machine.
- `kernel_device`: where a kernel test runs the Triton kernels: "cuda" with a GPU (compiled kernels,
  checked against the reference, TF32 off), else "cpu" with TRITON_INTERPRET=1 set for that test by the
  fixture itself. The module-level default below only makes that possible: triton must be imported
  in interpreter mode for the interpreter to work at all in the process.
- `tiny_src`: a small deterministic demo tree (made once per session);
  `tiny_prepped`: that tree through fastvit-prep at 32 and 64 px, both formats (made once per session).
  Session scope keeps FFCV/DALI set-up cost (numba compiles) out of every test.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # triton.language decides interpreted vs compiled when it is first imported (its own @triton.jit
    # helpers, tl.zeros...): the interpreter cannot be switched on later in a process, so without a GPU it
    # is on from here (unless the user set TRITON_INTERPRET=0: then the kernel-path tests skip, saying so)
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETER_ON_CPU = not HAS_CUDA and os.environ.get("TRITON_INTERPRET") == "1"

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY_RES = (32, 64)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_real = pytest.mark.skip(reason=f"needs {SHARED_DATA} (real-data tier)")
    for item in items:
        if "kernel_device" in getattr(item, "fixturenames", ()) and "device_dependent" not in item.keywords:
            item.add_marker(pytest.mark.device_dependent)
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "realdata" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(skip_real)


@pytest.fixture
def kernel_device(monkeypatch):
    """"cuda" (the compiled Triton kernels, TF32 off so fp32 references are exact) with a GPU; else "cpu"
    with the Triton interpreter on for this test (TRITON_INTERPRET=1, set here, not by the environment)."""
    if HAS_CUDA:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield "cuda"
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev
    else:
        if not INTERPRETER_ON_CPU:
            pytest.skip("no GPU, and TRITON_INTERPRET=0 was set before triton was imported: the Triton "
                        "interpreter cannot run the kernels in this process")
        monkeypatch.setenv("TRITON_INTERPRET", "1")    # whatever an earlier test or the environment did
        yield "cpu"


@pytest.fixture
def check_fullgraph_op():
    """check(m, args, op, leaves=()): m(*args) (a scalar loss) under torch.compile(fullgraph=True) --
    a graph break raises -- through an AOT-autograd backend that records its graphs: the forward graph
    calls fastvit::{op}, the backward graph fastvit::{op}_backward, and loss and the grads of m's
    parameters and of `leaves` equal eager's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def check(m, args, op: str, leaves=()):
        graphs = {"fw": [], "bw": []}

        def record(kind):
            def compiler(gm, example_inputs):
                graphs[kind].append(str(gm.graph))
                return make_boxed_func(gm.forward)
            return compiler

        torch._dynamo.reset()
        leaves = list(leaves) + list(m.parameters())
        eager = m(*args)
        eager.backward()
        eager_grads = [t.grad.clone() for t in leaves]
        for t in leaves:
            t.grad = None
        compiled = torch.compile(m, fullgraph=True, backend=aot_autograd(fw_compiler=record("fw"),
                                                                         bw_compiler=record("bw")))
        loss = compiled(*args)
        loss.backward()
        assert any(f"fastvit.{op}.default" in g for g in graphs["fw"])
        assert any(f"fastvit.{op}_backward.default" in g for g in graphs["bw"])
        torch.testing.assert_close(loss, eager)
        for t, g in zip(leaves, eager_grads):
            torch.testing.assert_close(t.grad, g)
    return check


@pytest.fixture
def ptx_counts():
    """run(script) -> {name: (ints...)}: runs a Python script that compiles Triton kernels for sm_90
    (no GPU needed; TRITON_INTERPRET removed from its environment) and prints `name n1 n2 ...` lines.
    Skips when Triton has no CUDA backend here."""
    import subprocess
    import sys

    triton = pytest.importorskip("triton")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no CUDA backend here")

    def run(script: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return {line.split()[0]: tuple(map(int, line.split()[1:])) for line in proc.stdout.splitlines()}
    return run


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory) -> Path:
    """A 4-class ImageNet-layout JPEG tree: train 16/class, val 6/class, sides 48-160 px."""
    from fastvit.data_prep.demo import make_demo_dataset

    out = tmp_path_factory.mktemp("tiny_src")
    make_demo_dataset(out, num_classes=4, train_per_class=16, val_per_class=6, seed=0,
                      min_side=48, max_side=160)
    return out


@pytest.fixture(scope="session")
def tiny_prepped(tiny_src, tmp_path_factory) -> Path:
    """tiny_src prepared at 32 and 64 px into FFCV and DALI files (OUT with manifest.json)."""
    from fastvit.data_prep import prep_dataset

    out = tmp_path_factory.mktemp("tiny_prepped")
    prep_dataset(tiny_src, out, resolutions=list(TINY_RES), formats=("ffcv", "dali"),
                 splits=("train", "val"), quality=90, workers=1, progress=False)
    return out
