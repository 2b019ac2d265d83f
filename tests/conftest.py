"""Shared fixtures and markers.

- `cuda` tests are skipped without a CUDA GPU; `realdata` tests without ../shared/data.
- Triton kernels run under TRITON_INTERPRET=1 on CPU tensors when there is no GPU; it must be set
  before triton is first imported, hence here.
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
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY_RES = (32, 64)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_real = pytest.mark.skip(reason=f"needs {SHARED_DATA} (real-data tier)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "realdata" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(skip_real)


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
