"""Interop: safetensors round trip (config in the metadata) and export of `_plain` models to timm."""
from __future__ import annotations

import pytest
import timm
import torch

from fastvit.models import (create_model, export_timm, load_safetensors, save_safetensors, timm_kwargs)

TINY = dict(embed_dim=32, num_heads=2, depth=2, img_size=32)


def _images(B, res, seed=0):
    return torch.randint(0, 256, (B, 3, res, res), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _normalized(m, x):
    """What timm must be fed: the float image normalized with the model's own statistics."""
    mean = torch.tensor(m.cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(m.cfg.std).view(1, 3, 1, 1)
    return (x.float() - mean) / std


@pytest.mark.parametrize("variant", [
    dict(class_token=True, head="token"),                      # classic ViT/DeiT head
    dict(),                                                    # our default: GAP -> fc_norm, no class token
    dict(class_token=True, head="gap", pos_embed="sincos"),    # GAP over patches while a class token rides along
])
def test_export_timm_gives_the_same_logits(variant):
    torch.manual_seed(0)
    m = create_model("vit_tiny_plain", num_classes=6, **TINY, **variant).eval()
    with torch.no_grad():                      # make biases/norms non-trivial so a mis-mapping shows
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    t = timm.create_model("vit_tiny_patch16_224", pretrained=False, **timm_kwargs(m)).eval()
    t.load_state_dict(export_timm(m), strict=True)
    for res in (32, 64):                       # base grid, and a resampled pos-embed (timm's dynamic size)
        x = _images(3, res)
        with torch.no_grad():
            ours, theirs = m(x), t(_normalized(m, x))
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_export_timm_refuses_locality_models():
    with pytest.raises(ValueError, match="only `_plain`"):
        export_timm(create_model("vit_tiny_local", **TINY))


def test_safetensors_round_trip_rebuilds_the_model_from_metadata(tmp_path):
    torch.manual_seed(0)
    m = create_model("vit_tiny_local", num_classes=4, class_token=True, head="token", **TINY).eval()
    path = save_safetensors(m, tmp_path / "sub" / "m.safetensors")
    assert path.is_file() and not list(path.parent.glob("*.tmp*"))
    loaded = load_safetensors(path).eval()                      # config from the file's metadata
    assert loaded.cfg == m.cfg
    x = _images(2, 64)
    with torch.no_grad():
        assert torch.equal(m(x), loaded(x))
    # into an existing model of the same config, and a clear error for a missing file
    other = create_model("vit_tiny_local", num_classes=4, class_token=True, head="token", **TINY)
    load_safetensors(path, other)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), other.state_dict().values()))
    with pytest.raises(FileNotFoundError):
        load_safetensors(tmp_path / "nope.safetensors")
