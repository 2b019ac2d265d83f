"""--model auto: candidates probed (cached per machine and shape), the law's argmax, the forecast in
results.json, the shape kept on --resume; a too-small budget and a law fitted elsewhere said in one line."""
from __future__ import annotations

import json

import pytest

from fastvit.train.cli import main

TINY = ["--preset", "test", "--device", "cpu", "--backend", "dali", "--no-progress"]
FAMILY = ["d1-w32", "d2-w32"]


@pytest.fixture
def small_family(monkeypatch, tmp_path):
    """Two tiny candidate shapes, a law fitted on this data's class count at 32 px, a private cache."""
    from fastvit import scaling
    from fastvit.models import shapes

    monkeypatch.setattr(shapes, "candidate_family", lambda device: list(FAMILY))
    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path / "cache"))
    law = _law(classes=4, resolution=32)
    return scaling.save_law(law, tmp_path / "scaling.json")


def _law(classes, resolution):
    """A law with known parameters fitted from its own exact points (3 sizes x 3 budgets)."""
    from fastvit import scaling

    true = {"E": 0.2, "A": 30.0, "alpha": 0.5, "B": 5.0, "beta": 0.45}
    pts = [{"shape": f"s{n}", "params": n, "images": d, "budget": d, "seed": 0,
            "top1": 100 * (1 - scaling.law_error(true, n, d))}
           for n in (2e4, 6e4, 2e5) for d in (2e3, 8e3, 3.2e4)]
    return scaling.fit_law(pts, data={"name": "synthetic", "classes": classes, "resolution": resolution},
                           provenance="test")


def test_choice_is_a_pure_function_and_measures_the_pick(small_family, tiny_prepped, tmp_path):
    from fastvit import scaling
    from fastvit.train import auto
    from fastvit.train.config import make_config
    from fastvit.train.setup import open_env

    cfg = make_config("test", {"data": str(tiny_prepped), "minutes": 2.0, "device": "cpu", "backend": "dali",
                               "model": "auto", "scaling": str(small_family)})
    env = open_env(cfg)
    law = scaling.load_law(small_family)
    calls = []

    def measure(c, stages):                  # a fake probe: the deeper shape is half as fast
        calls.append(c.model.depth)
        return stages, {s.shape: 1000.0 / c.model.depth for s in stages}, 0.5

    cache = auto.ProbeCache(auto.machine_key(env))
    a = auto.choose_model(cfg, env, measure, law, cache=cache)
    b = auto.choose_model(cfg, env, measure, law, cache=auto.ProbeCache(auto.machine_key(env)))
    def table(c):
        return [{k: v for k, v in r.items() if k != "speed_from"} for r in c.rows]
    assert table(a) == table(b)                            # same law, speeds and budget: the same table
    assert a.pick["speed_from"] == "probe" and b.pick["speed_from"] == "cache"
    assert len(calls) == len(set(calls)) >= 1              # the second choice measured nothing
    assert b.cache["hits"] >= 1 and a.cache["misses"] >= 1
    assert a.pick["top1"] == max(r["top1"] for r in a.rows)       # the argmax of the law's forecast


def test_run_with_model_auto_records_the_forecast_and_resume_keeps_the_shape(small_family, tiny_prepped, tmp_path,
                                                                            capsys):
    run = tmp_path / "run"
    rc = main(["--data", str(tiny_prepped), "--out", str(run), "--epochs", "4", "--evals", "0", "--model", "auto",
               "--scaling", str(small_family), "--ckpt-every-steps", "2", *TINY])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.count("model auto: ") >= 2 and "predicted top-1" in err
    res = json.loads((run / "results.json").read_text())
    plan = json.loads((run / "plan.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    pick = res["model_auto"]["pick"]
    assert pick["shape"] in FAMILY and plan["model_auto"]["pick"] == pick
    assert res["predicted_top1"]["top1"] == pick["top1"] and len(res["predicted_top1"]["interval"]) == 2
    from fastvit.models.shapes import parse_shape
    assert {k: cfg["model"][k] for k in ("depth", "embed_dim", "num_heads")} == \
        {k: parse_shape(pick["shape"])[k] for k in ("depth", "embed_dim", "num_heads")}
    assert cfg["model"]["name"] != "auto"
    # --resume: the saved config (the chosen shape) wins; no second choice
    from fastvit.train import checkpoint as C
    ckpts = C.checkpoint_paths(run)
    (run / "results.json").unlink()
    for p in ckpts[:1]:
        p.unlink()                                          # back to an earlier checkpoint
    rc = main(["--out", str(run), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "model auto: " not in err
    res2 = json.loads((run / "results.json").read_text())
    assert res2["model_auto"]["pick"] == pick


def test_too_small_a_budget_is_one_line(small_family, tiny_prepped, tmp_path, capsys):
    rc = main(["--data", str(tiny_prepped), "--out", str(tmp_path / "r"), "--minutes", "0.001", "--model", "auto",
               "--scaling", str(small_family), *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "error" in err[-1] and ("no time" in err[-1] or "raise --minutes" in err[-1])


def test_a_law_from_other_data_is_one_warning_line(small_family, tiny_prepped, tmp_path, capsys, monkeypatch):
    from fastvit import scaling

    other = scaling.save_law(_law(classes=1000, resolution=224), tmp_path / "other.json")
    rc = main(["--data", str(tiny_prepped), "--out", str(tmp_path / "r"), "--minutes", "5", "--model", "auto",
               "--scaling", str(other), "--dry-run", *TINY])
    out = capsys.readouterr().out
    warn = [line for line in out.splitlines() if line.startswith("warning:")]
    assert rc == 0 and len(warn) == 1 and "1000 classes" in warn[0]
    assert not (tmp_path / "r").exists()


def test_dry_run_model_auto_on_an_assumed_gpu_picks_without_probing(tiny_prepped, tmp_path, capsys, monkeypatch):
    from fastvit.train import auto

    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(auto, "measure_with", lambda *a: pytest.fail("probed on an assumed machine"))
    speed = tmp_path / "s.json"
    speed.write_text(json.dumps({"device": "GPU", "cores": 16, "memory_gb": 80, "points": [
        {"model": "vit_small_plain", "class_token": True, "head": "token", "res": 224, "keep": 1.0, "img_s": 8003}]}))
    rc = main(["--data", str(tiny_prepped), "--out", str(tmp_path / "r"), "--hours", "6", "--model", "auto",
               "--dry-run", "--assume-speed", str(speed), "--preset", "gpu", "--final-res", "64",
               "--curriculum", "32:0.5,64:0.5", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "model auto: " in out and "speed: assumed" in out
    assert not (tmp_path / "cache").exists() and not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------------
# growth as a candidate: weighed where the law has a growth term, picked where it pays

GROWS = {"curriculum": "32:0.5,64:0.5", "final_res": 64}       # two resolutions: depth 2 grows 1 -> 2


def _grown_law(c, classes=4, resolution=64):
    """_law with a growth term of this c (fitted on exact points of the same law growing 1 -> 2)."""
    from fastvit import scaling

    law = _law(classes, resolution)
    pts = [{"params": n, "images": d, "depth": 2, "images_shallow": {1: d / 2}, "budget": d,
            "top1": law.predict(n, d / 2 + scaling.credit(1, 2, c) * d / 2)}
           for n in (6e4, 2e5) for d in (2e3, 8e3, 3.2e4)]
    return scaling.fit_growth(law, pts, provenance="test")


def _growth_env(tiny_prepped, law_file, **extra):
    from fastvit.train.config import make_config
    from fastvit.train.setup import open_env

    cfg = make_config("test", {"data": str(tiny_prepped), "minutes": 2.0, "device": "cpu", "backend": "dali",
                               "model": "auto", "scaling": str(law_file), **GROWS, **extra})
    return cfg, open_env(cfg)


def _by_depth(c, stages):
    """A fake probe: images/s falls with the depth a stage runs at (a grown shape's shallow stage is fast)."""
    return stages, {s.shape: 1000.0 / (s.depth or c.model.depth) for s in stages}, 0.5


@pytest.mark.parametrize("c", [0.0, 2.0])
def test_grown_candidates_are_forecast_from_their_shallow_images(small_family, tiny_prepped, tmp_path, c):
    from fastvit import scaling
    from fastvit.train import auto

    law = _grown_law(c)
    cfg, env = _growth_env(tiny_prepped, scaling.save_law(law, tmp_path / "g.json"), auto_grow=True)
    choice = auto.choose_model(cfg, env, _by_depth, law)
    rows = {r["shape"]: r for r in choice.rows}
    assert set(rows) == {"d1-w32", "d2-w32", "d2-w32+grow"}          # depth 1 has nothing to grow from
    g, f = rows["d2-w32+grow"], rows["d2-w32"]
    shallow = g["images_shallow"][1]
    assert g["depths"] == [1, 2] and g["depth"] == 2 and set(g["images_shallow"]) == {1} and 0 < shallow < g["images"]
    assert g["images"] > f["images"]                                  # the shallow half runs faster
    assert g["images_effective"] == round(g["images"] - shallow + scaling.credit(1, 2, law.growth["c"]) * shallow)
    # c 0: growth is free speed and beats its fixed shape; c 2: its depth-1 images are worth nothing
    assert (g["top1"] > f["top1"]) == (c == 0.0)
    assert g["top1"] == pytest.approx(law.predict(g["params"], g["images_effective"]), abs=1e-3)


def test_a_grown_pick_trains_growing(small_family, tiny_prepped, tmp_path):
    from fastvit import scaling
    from fastvit.train import auto

    law = _grown_law(0.0)
    cfg, env = _growth_env(tiny_prepped, scaling.save_law(law, tmp_path / "g.json"), auto_grow=True)
    choice = auto.choose_model(cfg, env, _by_depth, law)
    grown = next(r for r in choice.rows if r["shape"].endswith("+grow"))
    choice.pick = grown
    run_cfg = auto.apply(cfg, choice)
    assert run_cfg.growth.mode == "manual" and run_cfg.model.depth == 2 and run_cfg.model.name != "auto"
    choice.pick = next(r for r in choice.rows if r["shape"] == "d2-w32")
    assert auto.apply(cfg, choice).growth.mode == "none"
    assert "grown shapes weighed, growth term c 0.00" in "\n".join(choice.lines())


def test_grown_shapes_are_weighed_only_when_asked_and_need_a_growth_term(small_family, tiny_prepped, tmp_path,
                                                                         capsys):
    from fastvit import scaling
    from fastvit.train import auto

    plain = scaling.save_law(_law(4, 64), tmp_path / "plain.json")
    grown = scaling.save_law(_grown_law(0.5), tmp_path / "g.json")
    names = lambda cfg, env, law: [r["shape"] for r in auto.choose_model(cfg, env, _by_depth, law).rows]  # noqa: E731
    # the default (--auto-grow off, the evidence's): fixed shapes only, even with a growth term
    cfg, env = _growth_env(tiny_prepped, grown)
    choice = auto.choose_model(cfg, env, _by_depth, _grown_law(0.5))
    assert not any(r["shape"].endswith("+grow") for r in choice.rows)
    assert "grown shapes not weighed (--auto-grow off)" in "\n".join(choice.lines())
    # --growth auto: AutoProg decides the depth during the run, so only fixed shapes are weighed, and asking
    # for grown ones too is a usage error
    from fastvit.train.errors import TrainError
    cfg, env = _growth_env(tiny_prepped, grown, growth="auto")
    choice = auto.choose_model(cfg, env, _by_depth, _grown_law(0.5))
    assert not any(r["shape"].endswith("+grow") for r in choice.rows)
    assert "grown shapes not weighed (--growth auto: AutoProg chooses the depth)" in "\n".join(choice.lines())
    cfg, env = _growth_env(tiny_prepped, grown, growth="auto", auto_grow=True)
    with pytest.raises(TrainError, match="give one of them"):
        auto.choose_model(cfg, env, _by_depth, _grown_law(0.5))
    # --growth manual: grown shapes only
    cfg, env = _growth_env(tiny_prepped, grown, growth="manual")
    assert all(n.endswith("+grow") for n in names(cfg, env, _grown_law(0.5)))
    # --growth manual where nothing can grow (one resolution): one line and exit 2, no traceback
    rc = main(["--data", str(tiny_prepped), "--out", str(tmp_path / "r1"), "--minutes", "5", "--model", "auto",
               "--growth", "manual", "--scaling", str(grown), "--dry-run", *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no candidate grows" in err[0], err
    # grown shapes asked for with a law that cannot forecast them: one line and exit 2
    for flags in (["--growth", "manual"], ["--auto-grow"]):
        rc = main(["--data", str(tiny_prepped), "--out", str(tmp_path / "r"), "--minutes", "5", "--model", "auto",
                   *flags, "--scaling", str(plain), "--curriculum", "32:0.5,64:0.5", "--final-res", "64",
                   "--dry-run", *TINY])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "no growth term" in err[0] and flags[0] in err[0], err


def test_the_probe_cache_of_a_rank_other_than_0_writes_nothing(tmp_path):
    from fastvit.stage import Stage
    from fastvit.train import auto

    stages = [Stage(res=32, batch_size=8)]
    auto.ProbeCache("k", root=tmp_path, write=False).put("d1-w32", stages, {stages[0].shape: 10.0})
    assert not (tmp_path / "probe-k.json").exists()
    auto.ProbeCache("k", root=tmp_path).put("d1-w32", stages, {stages[0].shape: 10.0})
    assert auto.ProbeCache("k", root=tmp_path).get("d1-w32", stages) == {stages[0].shape: 10.0}


def test_every_rank_chooses_from_rank_0s_cache_and_measurements(small_family, tiny_prepped, tmp_path):
    """sync (torchrun: rank 0's object on every rank) replaces this rank's cache and probe results: the choice
    is made from rank 0's, whatever this rank read or measured."""
    from fastvit import scaling
    from fastvit.train import auto
    from fastvit.train.config import make_config
    from fastvit.train.setup import open_env

    cfg = make_config("test", {"data": str(tiny_prepped), "minutes": 2.0, "device": "cpu", "backend": "dali",
                               "model": "auto", "scaling": str(small_family)})
    env = open_env(cfg)
    law = scaling.load_law(small_family)
    cache = auto.ProbeCache("mine", root=tmp_path / "c")
    for spec in FAMILY:                                   # this rank's cache knows every shape...
        stages = auto.candidates(cfg, env)[FAMILY.index(spec)].stages
        cache.put(spec, stages, {s.shape: 5.0 for s in stages})

    def rank0(obj):                                       # ...rank 0's knows none, and measured 10x faster
        if isinstance(obj, dict):
            return {}
        stages, speeds, _ = obj
        return stages, {k: 10 * v for k, v in speeds.items()}, 1.25

    def measure(c, stages):
        return stages, {s.shape: 100.0 for s in stages}, 0.5

    choice = auto.choose_model(cfg, env, measure, law, cache=cache, sync=rank0)
    assert choice.cache["hits"] == 0 and choice.pick["speed_from"] == "probe"
    assert choice.probe_s == pytest.approx(1.25 * sum(r["speed_from"] == "probe" for r in choice.rows))
    assert set(choice.pick["img_s"].values()) == {1000.0}
