"""fastvit-search: κ and L against direct computations, the rank sum and growth step as pure functions,
best.yaml into fastvit-train's config loader, and the command end to end on the tiny data."""
from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from fastvit.models import create_model
from fastvit.search import cli, measures, rank
from fastvit.search.space import Candidate, grow_proposals, search_space


@pytest.fixture(autouse=True)
def _reference_patch_embed(monkeypatch):
    """The plain-PyTorch embedding (the Triton interpreter would take seconds per step on CPU)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _tiny(seed=0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    cfg = dict(depth=2, embed_dim=16, num_heads=2, img_size=32, patch_size=8, num_classes=5)
    cfg.update(kw)
    return create_model("vit_tiny_local", **cfg).double().train()


# ---------------------------------------------------------------------------------------------- κ

def test_kappa_equals_condition_number_of_explicit_per_sample_gradients():
    model = _tiny()
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = []
    for i in range(6):                                   # one image at a time: its own forward and backward
        model.zero_grad()
        z = model.forward_features(images[i:i + 1])[:, model.num_prefix_tokens:].mean(dim=1)   # (1,D) pooled
        z.sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for n, p in model.named_parameters()
                               if "weight" in n and p.grad is not None]))   # As-ViT: unreached ones skipped
    g = torch.stack(rows)
    ev = torch.linalg.eigvalsh(g @ g.T)
    direct = (ev[-1] / ev[0]).item()
    model.zero_grad()
    got = measures.ntk_condition(model, images)
    assert got == pytest.approx(direct, rel=1e-6)
    assert got > 1.0
    # biases, pos_embed and class token are not in the kernel
    names = [n for n, _ in measures.weight_params(model)]
    assert "pos_embed" not in names and not any(n.endswith(".bias") for n in names)


def test_kappa_of_a_bad_kernel_is_the_worst_value():
    assert measures.condition_number(torch.tensor([[1.0, 1.0], [1.0, 1.0]])) == math.inf     # singular
    assert measures.condition_number(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]])) == math.inf
    assert measures.condition_number(torch.diag(torch.tensor([2.0, 8.0]))) == pytest.approx(4.0)


# ---------------------------------------------------------------------------------------------- L

def test_length_measure_sees_the_net_without_layernorms_and_normalised_input():
    model = _tiny(local=True)
    m = measures.for_length(model)
    assert not any(isinstance(x, nn.LayerNorm) for x in m.modules())
    # its embedding of a normalised image is the fused embedding of the pixel image
    px = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    mean, std = model.norm_stats(px)
    norm = (px - torch.tensor(mean, dtype=px.dtype).view(1, 3, 1, 1)) / torch.tensor(std, dtype=px.dtype).view(1, 3, 1, 1)
    idx = torch.arange(16).expand(2, 16)
    pos = model.pos_embed_for_grid((4, 4))
    torch.testing.assert_close(m.patch_embed(norm, idx, pos, None, None),
                               model.patch_embed(px, idx, pos, mean, std), rtol=1e-5, atol=1e-6)


def test_length_equals_finite_difference_of_the_output_curve():
    model = _tiny(seed=3)
    got = measures.length_distortion(model, 32, torch.Generator().manual_seed(7), thetas=10)
    u = measures.random_plane(32, torch.Generator().manual_seed(7))               # the same plane
    m = measures.for_length(model)
    theta = torch.linspace(0, 2 * math.pi, 10, dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        z_plus = measures.pooled_features(m, measures.circle_points(u, theta + h, 32, torch.float64)[0])
        z_minus = measures.pooled_features(m, measures.circle_points(u, theta - h, 32, torch.float64)[0])
    fd = ((z_plus - z_minus) / (2 * h)).norm(dim=1).sum().item()
    assert got == pytest.approx(fd, rel=1e-6)
    # and L·Δθ is the curve's length: close to the polyline through many points on it
    n = 400
    dense = measures.length_distortion(model, 32, torch.Generator().manual_seed(7), thetas=n)
    with torch.no_grad():
        zs = measures.pooled_features(m, measures.circle_points(
            u, torch.linspace(0, 2 * math.pi, n, dtype=torch.float64), 32, torch.float64)[0])
    polyline = (zs[1:] - zs[:-1]).norm(dim=1).sum().item()
    assert dense * 2 * math.pi / (n - 1) == pytest.approx(polyline, rel=1e-2)


def test_measure_averages_fresh_inits():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    made = []

    def make(seed):
        made.append(seed)
        return _tiny(seed=seed).float()
    m = measures.measure(make, images, 32, inits=2, seed=5)
    assert made == [5, 6] and m.params == sum(p.numel() for p in _tiny().parameters())
    k = [measures.ntk_condition(_tiny(seed=s).float(), images) for s in (5, 6)]
    assert m.kappa == pytest.approx(sum(k) / 2, rel=1e-4) and m.length > 0


# ---------------------------------------------------------------------------------------------- rank, grow

def test_rank_sum_is_dense_and_ordered_as_as_vit():
    assert rank.dense_ranks([3.0, 1.0, 3.0, 2.0], lower_is_better=True) == [2, 0, 2, 1]
    assert rank.dense_ranks([3.0, float("nan"), 1.0], lower_is_better=False) == [0, 2, 1]
    kappas, lengths = [10.0, 20.0, 30.0], [1.0, 3.0, 2.0]
    assert rank.rank_sum(kappas, lengths) == [2.0, 1.0, 3.0]
    assert rank.rank_sum(kappas, lengths, images=[5, 1, 9], speed_weight=2.0) == [4.0, 5.0, 3.0]
    # tie (1 and 1): κ's relative range 2/3 > L's 0.1 -> the lower κ wins
    assert rank.best([1.0, 1.0], [10.0, 30.0], [2.0, 1.8]) == 0
    assert rank.order([2.0, 1.0, 3.0], kappas, lengths) == [1, 0, 2]


def test_growth_step_is_a_pure_function_of_the_measures():
    rows = [{"kappa": 5.0, "length": 2.0, "images": 100},     # best measures but too slow
            {"kappa": 6.0, "length": 1.5, "images": 900},
            {"kappa": 7.0, "length": 1.9, "images": 800},
            {"kappa": 9.0, "length": 1.0, "images": 1000}]
    frozen = copy.deepcopy(rows)
    # among the three that fit: rank sums 1, 1, 4; the tie goes by L (relative range 0.47 > κ's 0.33)
    assert rank.grow_choice(rows, min_images=500) == 2
    assert rank.grow_choice(rows, min_images=500) == 2 and rows == frozen
    # the speed term breaks it the other way: row 1 sees more images than row 2
    assert rank.grow_choice(rows, min_images=500, speed_weight=1.0) == 1
    assert rank.grow_choice(rows, min_images=5000) is None
    assert rank.growth_done(600, 500) and not rank.growth_done(700, 500)
    c = Candidate(depth=4, embed_dim=192, num_heads=3, mlp_ratio=4.0, patch_size=16, local=True)
    props = grow_proposals(c)
    assert [p.embed_dim for p in props[:4]] == [204, 210, 222, 228]   # +5..20 %, nearest multiple of 6
    assert {p.depth for p in props} == {4, 5} and c not in props and len(props) == len(set(props)) == 9
    assert all(p.embed_dim % p.num_heads == 0 and p.embed_dim >= 192 for p in props)


def test_forecast_ranking_and_growth_step_are_pure():
    top1s, params = [40.0, None, 45.0, 45.0], [2e6, 1e6, 3e6, 2.5e6]
    frozen = (list(top1s), list(params))
    assert rank.forecast_order(top1s, params) == [3, 2, 0, 1]            # ties to fewer params, None last
    assert (top1s, params) == frozen
    images = [900, 900, 100, 900]
    assert rank.forecast_choice(top1s, images, params, min_images=500) == 3
    assert rank.forecast_choice(top1s, images, params, min_images=500, beat=46.0) is None   # no better forecast
    assert rank.forecast_choice(top1s, [100] * 4, params, min_images=500) is None


def test_search_space_keeps_only_valid_nets():
    cands = search_space(depths=(2,), widths=(96, 100), heads=(3, 4), mlp_ratios=(4,), patches=(16, 20),
                         locality=(True, False), res=96)
    assert {(c.embed_dim, c.num_heads, c.patch_size) for c in cands} == {(96, 3, 16), (96, 4, 16), (100, 4, 16)}
    assert len(cands) == 6


# ---------------------------------------------------------------------------------------------- YAML

def test_best_yaml_round_trips_into_fastvit_train(tmp_path):
    from fastvit.train.config import make_config

    c = Candidate(depth=3, embed_dim=204, num_heads=3, mlp_ratio=3.0, patch_size=8, local=False)
    ctx = SimpleNamespace(common={"data": "/data/fv", "hours": 2.5, "device": "cpu", "progress": False,
                                  "compile": False, "lr": 2e-3},
                          args=SimpleNamespace(hours=2.5), preset="cpu")
    r = {"candidate": c, "kappa": 12.5, "length": 0.3, "params": 1_000_000, "images": 12345}
    path = tmp_path / "best.yaml"
    path.write_text(cli.best_yaml(r, ctx))
    cfg = make_config("cpu", {}, str(path))
    assert cfg.model.name == "vit_tiny_plain" and cfg.model.overrides() == c.overrides()
    assert (cfg.data.root, cfg.budget.hours, cfg.run.device, cfg.optim.lr) == ("/data/fv", 2.5, "cpu", 2e-3)
    assert cfg.run.progress is True and cfg.run.compile is None           # the search's own settings stay out
    m = create_model(cfg.model.name, num_classes=10, **cfg.model.overrides())
    assert (m.cfg.depth, m.cfg.embed_dim, m.cfg.num_heads, m.cfg.mlp_ratio, m.cfg.patch_size, m.cfg.local) == \
        (3, 204, 3, 3.0, 8, False)


# ---------------------------------------------------------------------------------------------- CLI

SPACE = ["--preset", "test", "--depths", "1,2", "--widths", "16", "--heads", "2", "--patches", "8",
         "--locality", "on,off", "--inits", "1", "--grow-steps", "1", "--min-epochs", "0.5", "--device", "cpu",
         "--no-progress"]


def test_cli_end_to_end_and_resumes(tiny_prepped, tmp_path, monkeypatch, capsys):
    from fastvit.train.config import make_config

    out = tmp_path / "search"
    # the default ranking is As-ViT's rank sum (the best measured training-free τ); the law on request
    defaults = cli.build_parser().parse_args(["--data", "x", "--hours", "1"])
    assert (defaults.rank, defaults.speed_weight) == ("asvit", 0.0)
    argv = ["--data", str(tiny_prepped), "--hours", "0.02", "--out", str(out), *SPACE, "--rank", "law"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| # | candidate | score | law top-1 (%) [interval] |" in printed and "best: " in printed
    assert "the scaling law's top-1 forecast" in printed and "ranked by the scaling law's forecast" in printed
    # the shipped cpu prior was fitted on Imagenette at 96 px: the tiny data says so in one line
    assert sum("warning: the scaling law was fitted on" in ln for ln in printed.splitlines()) == 1
    res = json.loads((out / "search.json").read_text())
    assert res["rank"] == "law" and res["law"]["data"]["classes"] == 10
    assert len(res["ranked"]) == 4 and res["growth"][0]["key"] == res["ranked"][0]["key"]
    kept = [r for r in res["ranked"] if r["score"] is not None]
    assert [r["score"] for r in kept] == sorted((r["score"] for r in kept), reverse=True)   # best forecast first
    assert all(r["score"] == r["predicted_top1"] and r["interval"][0] <= r["score"] <= r["interval"][1] for r in kept)
    for r in res["ranked"]:
        assert {"kappa", "length", "params", "img_s", "images", "score"} <= set(r)
        assert r["images"] > 0 and r["length"] > 0
    files = sorted(p.name for p in (out / "candidates").iterdir())
    assert len(files) >= 4 and (out / "table.md").is_file()
    cfg = make_config("test", {}, str(out / "best.yaml"))
    best = res["best"]["candidate"]
    assert cfg.model.depth == best["depth"] and cfg.model.embed_dim == best["embed_dim"]
    assert cfg.data.root == str(tiny_prepped) and cfg.budget.hours == 0.02
    # a rerun (killed or not) measures nothing again; another budget re-ranks from the same files
    monkeypatch.setattr(measures, "measure", lambda *a, **k: pytest.fail("re-measured a finished candidate"))
    assert cli.main(argv) == 0
    assert json.loads((out / "search.json").read_text())["ranked"] == res["ranked"]
    assert cli.main([*argv[:3], "0.04", *argv[4:]]) == 0
    assert sorted(p.name for p in (out / "candidates").iterdir())[:len(files)] == files
    # As-ViT's rank sum on request, from the same files (no growth: it would measure new nets); the law still reported
    assert cli.main([*argv, "--rank", "asvit", "--grow-steps", "0"]) == 0
    res = json.loads((out / "search.json").read_text())
    assert res["rank"] == "asvit" and all(isinstance(r["score"], float) for r in res["ranked"] if r["fits"])
    assert all("predicted_top1" in r for r in res["ranked"])


def test_cli_errors_are_one_line(tiny_prepped, tmp_path, capsys):
    out = str(tmp_path / "s")
    assert cli.main(["--data", str(tmp_path / "missing"), "--hours", "1", "--out", out, *SPACE]) == 2
    assert cli.main(["--data", str(tiny_prepped), "--hours", "0", "--out", out, *SPACE]) == 2
    assert cli.main(["--data", str(tiny_prepped), "--hours", "1", "--out", out, *SPACE, "--widths", "15"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("fastvit-search: ") for line in err)
    assert "does not exist" in err[0] and "--hours" in err[1] and "no valid candidate" in err[2]
    assert cli.main(["--data", str(tiny_prepped), "--hours", "0.001", "--out", out, *SPACE,
                     "--min-epochs", "1e6"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no candidate sees" in err[0]
    (tmp_path / "bad.json").write_text("{}")
    assert cli.main(["--data", str(tiny_prepped), "--hours", "1", "--out", out, *SPACE, "--scaling",
                     str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastvit-search: --scaling: ") and "not a scaling law" in err[0]
