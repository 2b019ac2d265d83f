"""Shape specs: parse / name round trip, one-line errors, exact parameter counts against the built model,
and the candidate families `--model auto` weighs."""
from __future__ import annotations

import pytest

from fastvit.models import create_model
from fastvit.models.shapes import candidate_family, param_count, parse_shape, shape_name


def test_parse_defaults_heads_to_width_over_64_and_mlp_to_4():
    assert parse_shape("d4-w192") == {"depth": 4, "embed_dim": 192, "num_heads": 3, "mlp_ratio": 4.0}
    assert parse_shape("d6-w384-h6-m4") == {"depth": 6, "embed_dim": 384, "num_heads": 6, "mlp_ratio": 4.0}
    assert parse_shape("d2-w32") == {"depth": 2, "embed_dim": 32, "num_heads": 1, "mlp_ratio": 4.0}  # at least 1
    assert parse_shape(" d3-w256-m2.5 ")["mlp_ratio"] == 2.5


@pytest.mark.parametrize("spec", ["d4-w192", "d6-w384-h12", "d2-w256-m2", "d1-w96-h2-m3.5"])
def test_name_round_trips(spec):
    assert shape_name(parse_shape(spec)) == spec


def test_name_drops_defaults():
    assert shape_name({"depth": 4, "embed_dim": 192, "num_heads": 3, "mlp_ratio": 4.0}) == "d4-w192"
    assert shape_name({"depth": 4, "embed_dim": 192}) == "d4-w192"


@pytest.mark.parametrize("spec, msg", [
    ("4-192", "is not d<depth>-w<width>"), ("d4-w192-x", "is not d<depth>"), ("d0-w192", "must be positive"),
    ("d4-w200-h3", "3 heads do not divide width 200"), ("", "is not d<depth>"),
])
def test_bad_specs_are_one_line(spec, msg):
    with pytest.raises(ValueError, match=msg) as e:
        parse_shape(spec)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec, classes, patch", [("d4-w192", 10, 16), ("d2-w128-m2", 1000, 16),
                                                  ("d3-w96-h2", 7, 8)])
def test_param_count_is_the_built_models(spec, classes, patch):
    model = create_model("vit_tiny_local", num_classes=classes, patch_size=patch, **parse_shape(spec))
    assert param_count(spec, classes, patch_size=patch) == sum(p.numel() for p in model.parameters())


def test_param_count_plain_differs_from_local():
    plain = create_model("vit_tiny_plain", num_classes=10, **parse_shape("d2-w192"))
    assert param_count("d2-w192", 10, local=False) == sum(p.numel() for p in plain.parameters())
    assert param_count("d2-w192", 10, local=True) > param_count("d2-w192", 10, local=False)


def test_candidate_families():
    cpu, gpu = candidate_family("cpu"), candidate_family("cuda:1")
    assert "d2-w192" in cpu and "d4-w192" in cpu                     # the evidence's two shapes
    assert all(parse_shape(s)["embed_dim"] <= 256 for s in cpu)
    widths = {parse_shape(s)["embed_dim"] for s in gpu}
    assert widths == {192, 384, 576, 768} and {parse_shape(s)["depth"] for s in gpu} == {6, 9, 12}
    assert all(parse_shape(s)["num_heads"] == parse_shape(s)["embed_dim"] // 64 for s in gpu)
    assert candidate_family("cpu") is not candidate_family("cpu")    # a copy: the caller may change it
    with pytest.raises(ValueError, match="no candidate shapes for device 'mps'"):
        candidate_family("mps")
