"""fastvit.models: shapes, locality on sampled tokens, positional-embedding training, input conventions,
and one sweep over every registered variant. Tiny configs (small dims, depth 1-2, 32-128 px) keep it
fast on a 2-core CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastvit.kernels import sample_keep_indices
from fastvit.models import (create_model, list_models, local_dwconv, num_kept_patches, model_config,
                            vit_forward_flops)

TINY = dict(embed_dim=32, num_heads=2, depth=2)


def _images(B, H, W=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, 3, H, W or H), dtype=torch.uint8, generator=g)


def _model(name="vit_tiny_local", seed=0, **kw):
    torch.manual_seed(seed)
    return create_model(name, num_classes=kw.pop("num_classes", 7), **{**TINY, **kw}).eval()


# ---------------------------------------------------------------- registry / config
def test_registry_lists_the_six_variants_with_deit_sizes():
    assert list_models() == sorted(f"vit_{s}_{k}" for s in ("tiny", "small", "base") for k in ("local", "plain"))
    for size, (dim, heads) in {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}.items():
        cfg = model_config(f"vit_{size}_local")
        assert (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.patch_size, cfg.mlp_ratio) == (dim, heads, 12, 16, 4.0)
        assert cfg.local and not model_config(f"vit_{size}_plain").local
    # same parameter count as timm's ViT-S/16 (22.05M) for the plain variant
    with torch.device("meta"):                   # no memory, no init cost
        n = sum(p.numel() for p in create_model("vit_small_plain").parameters())
    assert abs(n - 22_050_664) < 1_000


@pytest.mark.parametrize("bad, match", [
    (dict(name="vit_huge_local"), "unknown model"),
    (dict(not_a_key=1), "unknown model config key"),
    (dict(head="token"), "class_token"),
    (dict(pos_embed="rope"), "pos_embed"),
    (dict(dwconv_impl="fft"), "dwconv_impl"),
])
def test_create_model_rejects_bad_names_and_keys_with_one_clear_error(bad, match):
    name = bad.pop("name", "vit_tiny_local")
    with pytest.raises(ValueError, match=match):
        create_model(name, **bad)


# ---------------------------------------------------------------- shapes
@pytest.mark.parametrize("hw, keep_rate", [((32, 32), None), ((32, 32), 0.5), ((64, 64), 0.25),
                                           ((64, 64), 1.0), ((48, 80), 0.5), ((128, 128), 0.1)])
@pytest.mark.parametrize("class_token", [False, True])
def test_shapes_for_res_and_keep(hw, keep_rate, class_token):
    head = "token" if class_token else "gap"
    m = _model(class_token=class_token, head=head, depth=1)
    H, W = hw
    N = (H // 16) * (W // 16)
    K = num_kept_patches(N, keep_rate)
    x = _images(3, H, W)
    feats = m.forward_features(x, keep_rate=keep_rate)
    assert feats.shape == (3, K + int(class_token), 32)
    assert m.forward_head(feats).shape == (3, 7)
    assert m.forward_head(feats, pre_logits=True).shape == (3, 32)
    assert m(x, keep_rate=keep_rate).shape == (3, 7)


def test_explicit_keep_idx_and_input_checks():
    m = _model(depth=1)
    x = _images(2, 64)
    idx = sample_keep_indices(2, 16, 5, "cpu", generator=torch.Generator().manual_seed(1))
    assert m.forward_features(x, keep_idx=idx).shape == (2, 5, 32)
    with pytest.raises(ValueError, match="multiples of the patch"):
        m(_images(2, 40))
    with pytest.raises(ValueError, match="not both"):
        m(x, keep_rate=0.5, keep_idx=idx)
    with pytest.raises(ValueError, match="keep_rate"):
        m(x, keep_rate=0.0)


def test_num_kept_patches_rule():
    assert num_kept_patches(196, None) == 196 and num_kept_patches(196, 1.0) == 196
    assert num_kept_patches(196, 0.5) == 98 and num_kept_patches(16, 0.01) == 1
    assert num_kept_patches(196, 0.25) == 49


# ---------------------------------------------------------------- locality on sampled tokens
def _dense_dwconv(grid_bnc, weight, bias, gh, gw):
    B, N, C = grid_bnc.shape
    img = grid_bnc.transpose(1, 2).reshape(B, C, gh, gw)                # (B,C,gh,gw), ordinary layout
    return F.conv2d(img, weight, bias, padding=1, groups=C).reshape(B, C, N).transpose(1, 2)   # (B,N,C)


@pytest.mark.parametrize("impl", ["conv", "taps"])
def test_local_dwconv_with_all_kept_equals_dense_conv(impl):
    torch.manual_seed(0)
    B, gh, gw, C = 2, 3, 5, 8
    x = torch.randn(B, gh * gw, C)
    w, b = torch.randn(C, 1, 3, 3), torch.randn(C)
    dense = _dense_dwconv(x, w, b, gh, gw)
    torch.testing.assert_close(local_dwconv(x, w, b, (gh, gw), impl=impl), dense)              # fast path
    ident = torch.arange(gh * gw).expand(B, -1)
    torch.testing.assert_close(local_dwconv(x, w, b, (gh, gw), ident, impl), dense)       # scatter/gather path
    # all kept but in a shuffled order: the tokens carry their positions, the result follows the order
    perm = torch.stack([torch.randperm(gh * gw) for _ in range(B)])                 # (B,N)
    xs = torch.gather(x, 1, perm[..., None].expand(-1, -1, C))
    expect = torch.gather(dense, 1, perm[..., None].expand(-1, -1, C))
    torch.testing.assert_close(local_dwconv(xs, w, b, (gh, gw), perm, impl), expect)


@pytest.mark.parametrize("impl", ["conv", "taps"])
def test_local_dwconv_with_dropped_patches_equals_dense_conv_on_zero_filled_grid_then_gather(impl):
    torch.manual_seed(0)
    B, gh, gw, C, K = 3, 4, 4, 6, 7
    idx = sample_keep_indices(B, gh * gw, K, "cpu", generator=torch.Generator().manual_seed(0))
    x = torch.randn(B, K, C, requires_grad=True)
    w, b = torch.randn(C, 1, 3, 3), torch.randn(C)
    zero_filled = torch.zeros(B, gh * gw, C)
    for bi in range(B):                          # the obvious loop, as the oracle
        for j in range(K):
            zero_filled[bi, idx[bi, j]] = x[bi, j]
    expect = torch.stack([_dense_dwconv(zero_filled, w, b, gh, gw)[bi, idx[bi]] for bi in range(B)])
    out = local_dwconv(x, w, b, (gh, gw), idx, impl)
    torch.testing.assert_close(out, expect)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("impl", ["conv", "taps"])
def test_keep_all_fast_path_matches_explicit_arange_exactly(impl):
    m = _model(dwconv_impl=impl)
    x = _images(2, 48)
    ident = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        a, b, c = m(x), m(x, keep_rate=1.0), m(x, keep_idx=ident)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_taps_and_conv_models_compute_the_same_logits():
    a = _model(class_token=True)
    b = _model(class_token=True, dwconv_impl="taps")
    b.load_state_dict(a.state_dict())
    x = _images(2, 64)
    idx = sample_keep_indices(2, 16, 9, "cpu", generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(a(x, keep_idx=idx), b(x, keep_idx=idx), rtol=1e-5, atol=1e-5)


def test_class_token_bypasses_the_conv_only():
    m = _model(class_token=True, head="token", depth=1)
    mlp = m.blocks[0].mlp
    torch.manual_seed(1)
    h = torch.randn(2, 1 + 9, 32)
    idx = torch.tensor([[0, 2, 4, 5, 8, 1, 3, 6, 7]] * 2)
    with torch.no_grad():
        out = mlp(h, (3, 3), idx, num_prefix=1)
        cls_expect = mlp.fc2(mlp.act(mlp.act(mlp.fc1(h[:, :1]))))
    torch.testing.assert_close(out[:, :1], cls_expect)


def test_keep_rate_works_in_eval_and_is_reproducible_with_a_generator():
    m = _model()
    x = _images(2, 64)
    with torch.no_grad():
        a = m(x, keep_rate=0.5, generator=torch.Generator().manual_seed(3))
        b = m(x, keep_rate=0.5, generator=torch.Generator().manual_seed(3))
        full = m(x)
    assert not m.training and torch.equal(a, b) and not torch.allclose(a, full)


def test_bf16_autocast_forward_backward_with_drop_path():
    m = _model(class_token=True, drop_path_rate=0.2).train()
    assert m.blocks[1].drop_path1.drop_prob == pytest.approx(0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(_images(2, 64), keep_rate=0.5)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    logits.float().logsumexp(-1).sum().backward()
    for n, p in m.named_parameters():          # grads land in the fp32 master weights
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n


# ---------------------------------------------------------------- positional embedding / inputs
@pytest.mark.parametrize("res", [64, 128])
def test_learned_pos_embed_gets_gradients_at_non_base_resolutions(res):
    m = _model(depth=1).train()                          # base grid 224/16 = 14x14
    param = m.pos_embed
    assert param.shape == (1, 196, 32)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    before = param.detach().clone()
    m(_images(2, res), keep_rate=0.5).logsumexp(-1).sum().backward()
    g = param.grad
    assert g is not None and g.abs().sum() > 0 and torch.isfinite(g).all()
    opt.step()
    assert m.pos_embed is param and not torch.equal(param.detach(), before)   # the same Parameter trains


def test_sincos_pos_embed_is_fixed_and_any_resolution():
    m = _model(pos_embed="sincos", depth=1)
    assert m.pos_embed is None and "pos_embed_fixed" not in m.state_dict()
    for res in (32, 96):
        assert m.pos_embed_for_grid((res // 16, res // 16)).shape == ((res // 16) ** 2, 32)
        assert torch.isfinite(m(_images(2, res), keep_rate=0.5)).all()


def test_uint8_and_float_inputs_give_the_same_logits():
    m = _model(class_token=True)
    x = _images(2, 64)
    idx = sample_keep_indices(2, 16, 8, "cpu", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = m(x, keep_idx=idx)
        b = m(x.float() / 255.0, keep_idx=idx)          # float convention: [0, 1]
        c = m(x.double().div(255.0).float(), keep_idx=idx)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, c)


def test_no_weight_decay_names_are_parameters():
    m = _model(class_token=True, head="token")
    names = {n for n, _ in m.named_parameters()}
    assert m.no_weight_decay() & names == {"pos_embed", "cls_token"}


def test_flop_formula_counts_sampled_tokens():
    cfg = model_config("vit_small_plain")
    full = vit_forward_flops(cfg, 224)
    assert 8.4e9 < full < 9.4e9                   # ViT-S/16 at 224: ~4.6 GMAC (timm/fvcore)
    assert vit_forward_flops(cfg, 224, keep=98) < 0.55 * full
    assert vit_forward_flops(model_config("vit_small_local"), 224) > full


# ---------------------------------------------------------------- every registered variant
@pytest.mark.parametrize("name", list_models())
def test_every_variant_forward_backward_grads_everywhere(name):
    torch.manual_seed(0)
    m = create_model(name, num_classes=5, depth=1, drop_path_rate=0.1).train()
    x = _images(2, 32)
    logits = m(x, keep_rate=0.5)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 3])).backward()
    for n, p in m.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {n}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {n}"
