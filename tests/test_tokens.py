"""Coarse-to-fine tokens: PI-resize of the one master patch weight, the token-size schedule as a pure
function of progress, the planner's stages, the fused kernel and sparse locality exact at patch 32, 16
and 8, and a training run that switches patch size."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fastvit.models import create_model
from fastvit.models.flexi import pi_resize, pool_resize, resize_matrix
from fastvit.train import schedules as S
from fastvit.train.planner import build_stages


def test_pi_resize_is_the_identity_at_the_master_size_and_inverts_the_resize_elsewhere():
    w = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    assert pi_resize(w, 16) is w
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64)                  # patches at the master size
    w32 = pi_resize(w, 32)
    up = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)   # the same patches, 2x
    torch.testing.assert_close(torch.einsum("dchw,bchw->bd", w32, up), torch.einsum("dchw,bchw->bd", w, x))
    # shrinking: the least-squares solution of Bᵀŵ ≈ w (normal equations B Bᵀ ŵ = B w per channel)
    w8 = pi_resize(w, 8)
    B = resize_matrix(16, 8)                                             # (64, 256)
    lhs = w8.reshape(18, 64) @ (B @ B.T).T
    rhs = w.reshape(18, 256) @ B.T
    torch.testing.assert_close(lhs, rhs)
    # the same numbers as timm's FlexiViT resize with the same interpolation (fp32 there)
    from timm.layers.patch_embed import resample_patch_embed

    for q in (32, 8):
        ref = resample_patch_embed(w.float(), [q, q], interpolation="bilinear", antialias=q < 16)
        torch.testing.assert_close(pi_resize(w, q).float(), ref, rtol=1e-4, atol=1e-4)


def test_gradient_reaches_the_master_weight_at_every_patch_size():
    w = torch.randn(4, 3, 16, 16, requires_grad=True)
    (pi_resize(w, 32).sum() + pi_resize(w, 8).sum()).backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_model_token_at_the_original_size_and_at_a_resized_patch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    m = create_model("vit_tiny_local", num_classes=5, depth=1, embed_dim=16, num_heads=2).double()
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(m(x), m(x, patch_size=16), rtol=0, atol=0)      # the original token, exactly
    mean, std = m.norm_stats(x)
    idx = torch.arange(16).expand(2, 16)
    pos = m.pos_embed_for_grid((4, 4))
    # every 16x16 patch resized to 32x32 on its own (the PI-resize property is per patch)
    tiles = x.reshape(2, 3, 4, 16, 4, 16).permute(0, 2, 4, 1, 3, 5).reshape(32, 3, 16, 16)
    tiles = F.interpolate(tiles, size=(32, 32), mode="bilinear", align_corners=False)
    up = tiles.reshape(2, 4, 4, 3, 32, 32).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 128, 128)
    # patch 32 on that image = patch 16 on the image (normalisation is per-channel affine: it commutes)
    torch.testing.assert_close(m.patch_embed(up, idx, pos, mean, std, patch_size=32),
                               m.patch_embed(x, idx, pos, mean, std), rtol=1e-5, atol=1e-6)
    assert m(x, patch_size=32).shape == m(x, patch_size=8).shape == (2, 5)
    from fastvit.models import train_flops_per_image                   # MFU counts the stage's own tokens

    assert train_flops_per_image(m, 64, patch_size=32) < train_flops_per_image(m, 64) < \
        train_flops_per_image(m, 64, patch_size=8)


def test_pool_resize_is_the_master_kernel_on_the_pooled_patch():
    w = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    assert pool_resize(w, 16) is w
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    tok = lambda w_, x_: torch.einsum("dchw,bchw->bd", w_, x_)       # noqa: E731 (one patch -> one token)
    torch.testing.assert_close(tok(pool_resize(w, 32), x), tok(w, F.avg_pool2d(x, 2)))
    x8 = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(tok(pool_resize(w, 8), x8), tok(w, F.interpolate(x8, scale_factor=2, mode="nearest")))
    with pytest.raises(ValueError, match="divide each other"):
        pool_resize(w, 24)


def test_model_pool_tokens_equal_the_plain_embedding_and_a_conv_on_the_pooled_image(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    kw = dict(num_classes=5, depth=1, embed_dim=16, num_heads=2)
    m = create_model("vit_tiny_local", token_resize="pool", **kw).double()
    ref = create_model("vit_tiny_local", **kw).double()
    ref.load_state_dict(m.state_dict())                                 # same parameters, PI-resize mode
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(m(x, patch_size=16), ref(x), rtol=0, atol=0)     # the master size: exactly
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)
    mean, std = m.norm_stats(x)
    xn = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    idx = torch.arange(4).expand(2, 4)
    pos = m.pos_embed_for_grid((2, 2))
    # patch 32 = the master 16x16 kernel, stride 16, over the normalized image average-pooled by 2
    conv = F.conv2d(F.avg_pool2d(xn, 2), m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=16)
    want = conv.flatten(2).transpose(1, 2) + pos                         # (2,4,D)
    torch.testing.assert_close(m.patch_embed(x, idx, pos, mean, std, patch_size=32), want)
    assert m(x, patch_size=32).shape == (2, 5)


def test_token_schedule_is_a_pure_function_of_progress():
    tokens = S.parse_tokens("32:0.3,16:0.7", model_patch=16)
    assert tokens == [(32, 0.3), (16, 1.0)]
    assert [S.patch_at(p, tokens) for p in (0.0, 0.29, 0.3, 0.9, 1.0)] == [32, 32, 16, 16, 16]
    with pytest.raises(ValueError, match="last token size"):
        S.parse_tokens("16:0.5,32:0.5", model_patch=16)


def test_planner_cuts_at_token_stages_and_budgets_tokens():
    kw = dict(curriculum=[(64, 0.5), (128, 1.0)], keep_kind="fixed", keep_min=1.0, keep_full_from=1.0,
              keep_cycles=1, keep_step=0.125, splits_per_stage=1, base_batch=64, ref_res=128, const_tokens=True,
              max_batch=4096, lr_rule="sqrt", patch=16)
    st = build_stages(**kw, tokens=[(32, 0.25), (16, 1.0)])
    assert [(s.res, s.patch_size, s.f0, s.f1) for s in st] == [(64, 32, 0.0, 0.25), (64, None, 0.25, 0.5),
                                                               (128, None, 0.5, 1.0)]
    # tokens per batch constant: 64 px at patch 32 has 4 tokens, at 16 px 16, at 128 px 64
    assert [s.batch_size for s in st] == [1024, 256, 64]
    assert build_stages(**kw) == build_stages(**kw, tokens=None)
    assert all(s.patch_size is None for s in build_stages(**kw))


@pytest.mark.parametrize("patch,resize", [(32, "pi"), (16, "pi"), (8, "pi"), (32, "pool"), (8, "pool")])
def test_fused_kernel_and_sparse_locality_exact_at_patch(patch, resize, monkeypatch, kernel_device):
    """Sampled tokens at a resized patch: the Triton path (fused embedding + sparse locality conv: on the
    GPU when there is one, else under the interpreter, which `kernel_device` turns on) against the plain
    path on the CPU with the interpreter off (reference embedding + scatter -> dense conv -> gather)."""
    import copy

    torch.manual_seed(0)
    m = create_model("vit_tiny_local", num_classes=5, depth=1, embed_dim=32, num_heads=2, token_resize=resize)
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    n = (64 // patch) ** 2
    keep_idx = torch.stack([torch.randperm(n)[: max(1, n // 2)] for _ in range(2)])   # (2,K) sampled

    def run(model, dev):
        model.zero_grad()
        out = model(x.to(dev), keep_idx=keep_idx.to(dev), patch_size=patch)
        out.square().sum().backward()
        return out.detach().cpu(), {k: p.grad.cpu() for k, p in model.named_parameters() if p.grad is not None}

    fused, g_fused = run(copy.deepcopy(m).to(kernel_device), kernel_device)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)             # the CPU reference path
    plain, g_plain = run(m, "cpu")
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    assert g_fused.keys() == g_plain.keys() and "patch_embed.proj.weight" in g_fused
    for k in g_fused:
        scale = g_plain[k].abs().max().clamp(min=1.0)
        torch.testing.assert_close(g_fused[k] / scale, g_plain[k] / scale, rtol=1e-4, atol=1e-4, msg=k)


def test_training_run_switches_token_size(tiny_prepped, tmp_path, monkeypatch):
    from fastvit.train.cli import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    run = tmp_path / "run"
    rc = main(["--data", str(tiny_prepped), "--out", str(run), "--epochs", "4", "--tokens", "32:0.5,16:0.5",
               "--final-res", "64", "--curriculum", "64:1", "--preset", "test", "--device", "cpu",
               "--backend", "dali", "--no-progress"])
    assert rc == 0
    plan = json.loads((run / "plan.json").read_text())
    assert [s["patch_size"] for s in plan["stages"]] == [32, None]
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == res["planned_steps"] and res["top1"] >= 0.0
    assert main(["--data", str(tiny_prepped), "--out", str(tmp_path / "bad"), "--epochs", "1", "--tokens",
                 "32:0.5,16:0.5", "--final-res", "48", "--curriculum", "48:1", "--preset", "test",
                 "--device", "cpu", "--no-progress"]) == 2


def test_training_run_with_pooled_coarse_tokens(tiny_prepped, tmp_path, monkeypatch):
    from fastvit.train.cli import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    run = tmp_path / "run"
    common = ["--final-res", "64", "--curriculum", "64:1", "--preset", "test", "--device", "cpu", "--no-progress"]
    rc = main(["--data", str(tiny_prepped), "--out", str(run), "--epochs", "2", "--tokens", "32:0.5,16:0.5",
               "--token-resize", "pool", "--keep-schedule", "fixed", "--keep-min", "0.5", *common])
    assert rc == 0
    plan = json.loads((run / "plan.json").read_text())
    first, last = plan["stages"][0], plan["stages"][-1]
    assert first["patch_size"] == 32 and first["keep"] < 1 and last["patch_size"] is None   # sampled at 32
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == res["planned_steps"] and res["top1"] >= 0.0
    assert main(["--data", str(tiny_prepped), "--out", str(tmp_path / "bad"), "--epochs", "1", "--tokens",
                 "24:0.5,16:0.5", "--token-resize", "pool", *common]) == 2
