"""sample_keep_indices: sorted, distinct, in range, uniform, reproducible."""
from __future__ import annotations

import pytest
import torch

from fastvit.kernels import sample_keep_indices


@pytest.mark.parametrize("B, N, K", [(1, 1, 1), (4, 196, 98), (3, 64, 64), (5, 49, 1)])
def test_sorted_distinct_in_range(B, N, K):
    idx = sample_keep_indices(B, N, K, "cpu", generator=torch.Generator().manual_seed(1))
    assert idx.shape == (B, K) and idx.dtype == torch.int64
    assert ((idx >= 0) & (idx < N)).all()
    assert (idx[:, 1:] > idx[:, :-1]).all()          # strictly increasing: sorted and distinct
    if K == N:
        assert torch.equal(idx, torch.arange(N).expand(B, N))


def test_reproducible_with_generator():
    a = sample_keep_indices(8, 196, 49, "cpu", generator=torch.Generator().manual_seed(7))
    b = sample_keep_indices(8, 196, 49, "cpu", generator=torch.Generator().manual_seed(7))
    c = sample_keep_indices(8, 196, 49, "cpu", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])               # images draw independently


def test_uniform_over_patches():
    # 4000 draws of 2 of 8: every patch kept with probability 1/4 -> 1000 +- ~27 (sd)
    idx = sample_keep_indices(4000, 8, 2, "cpu", generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(idx.flatten(), minlength=8)
    assert ((counts - 1000).abs() < 150).all(), counts


@pytest.mark.parametrize("K, N", [(0, 4), (5, 4)])
def test_bad_k_raises(K, N):
    with pytest.raises(ValueError, match="1 <= K <= N"):
        sample_keep_indices(2, N, K, "cpu")


@pytest.mark.cuda
def test_on_cuda_device():
    g = torch.Generator(device="cuda").manual_seed(0)
    idx = sample_keep_indices(16, 196, 98, "cuda", generator=g)
    assert idx.is_cuda and (idx[:, 1:] > idx[:, :-1]).all() and idx.max() < 196
