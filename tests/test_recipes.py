"""Recipes as files: every preset is one YAML file in fastvit/recipes/ (repo root: recipes/), written out
in full with a comment per group, shipped as package data, and the presets are exactly those files."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

import fastvit
from fastvit.settings import leaves
from fastvit.sweep import variants
from fastvit.train.cli import build_parser, config_from_args
from fastvit.train.config import PRESETS, RECIPES_DIR, TrainConfig, make_config, read_recipe

FILES = sorted(RECIPES_DIR.glob("*.yaml"))
SECTIONS = {"data", "model", "keep", "schedule", "optim", "augment", "growth", "budget", "run"}
ROOT = Path(fastvit.__file__).resolve().parents[1]


def _paths(d: dict, path: tuple = ()) -> set[tuple]:
    """The leaf paths a nested settings dict sets."""
    out: set[tuple] = set()
    for k, v in d.items():
        out |= _paths(v, path + (k,)) if isinstance(v, dict) else {path + (k,)}
    return out


def missing_settings(d: dict) -> list[str]:
    """The settings of a run (every leaf of TrainConfig) a nested dict does not write out."""
    return sorted(".".join(p) for p, _, _ in leaves(TrainConfig) if p not in _paths(d))


def test_the_presets_are_the_recipe_files():
    assert {"gpu", "cpu", "test"} <= set(PRESETS)
    assert sorted(PRESETS) == sorted(p.stem for p in FILES)
    assert build_parser().parse_args(["--preset", "cpu-d2"]).preset == "cpu-d2"     # every file is a --preset


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_every_recipe_loads_writes_every_setting_and_equals_its_preset(path):
    raw = yaml.safe_load(path.read_text())
    assert set(raw) == SECTIONS                                                       # nested by section
    assert missing_settings(raw) == []
    assert _paths(raw) == {p for p, _, _ in leaves(TrainConfig)}                      # and nothing else
    cfg = make_config(path.stem, {})
    assert cfg == TrainConfig.from_dict(read_recipe(path))
    # the file is the whole config, value for value: no default is left implicit
    assert json.loads(json.dumps(cfg.to_dict())) == raw
    # and it works as a --config file too, on any default preset
    assert make_config("test", {}, str(path)) == cfg


def test_the_completeness_check_finds_a_missing_setting(tmp_path):
    raw = yaml.safe_load((RECIPES_DIR / "cpu.yaml").read_text())
    del raw["optim"]["ema_halflife"], raw["data"]["loader"]["order"]
    assert missing_settings(raw) == ["data.loader.order", "optim.ema_halflife"]


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_every_group_has_a_comment_saying_where_its_values_come_from(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith(f"# Recipe `{path.stem}`")
    for i, line in enumerate(lines):
        if re.fullmatch(r"[a-z_]+:", line):                                           # a section
            above = [x for x in lines[:i] if x.strip()][-1]
            assert above.startswith("#"), f"{path.name}: section {line} has no comment"


def test_evidence_recipes_are_the_sweeps_variants_on_the_preset_they_ran():
    """The studies before issue 22's grid ran the cpu preset at depth 4 (now cpu-d4); the cpu preset is that
    recipe at the grid's best shape, d2-w128 (bench/results/auto/README.md)."""
    res = [64, 128, 224]
    base = make_config("cpu-d4", {})
    assert make_config("cpu-d4", variants.resolve("growth", base, res)) == make_config("cpu-growth", {})
    assert make_config("cpu-d4", variants.resolve("baseline", base, res)) == make_config("cpu-baseline", {})
    assert make_config("cpu-d4", {"depth": 2}) == make_config("cpu-d2", {})           # the growth study's none_d2
    assert make_config("cpu-d4", variants.resolve("fastvit+shape=d2-w128", base, res)) == make_config("cpu", {})
    assert (base.model.depth, make_config("cpu", {}).model.embed_dim) == (4, 128)
    # a recipe file is a sweep variant as NAME=FILE.yaml (the run's own settings left to the sweep)
    item = f"d2={RECIPES_DIR / 'cpu-d2.yaml'}"
    assert variants.label(item) == "d2"
    assert make_config("cpu-d4", variants.check(item, "cpu-d4", {}, res)) == make_config("cpu-d2", {})


def test_a_recipe_file_as_config_under_flags(tmp_path):
    args = build_parser().parse_args(["--config", str(RECIPES_DIR / "cpu-d2.yaml"), "--data", str(tmp_path),
                                      "--minutes", "0.5", "--lr", "0.004"])
    cfg = config_from_args(args)
    want = make_config("cpu-d2", {"data": str(tmp_path), "minutes": 0.5, "lr": 0.004})
    assert cfg == want and cfg.model.depth == 2 and cfg.budget.minutes == 0.5 and cfg.optim.lr == 0.004


def test_recipes_ship_with_the_package_and_the_checkout_links_them():
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("an installed fastvit: no checkout around it")
    assert (ROOT / "recipes").resolve() == RECIPES_DIR.resolve()                      # recipes/ -> fastvit/recipes
    assert RECIPES_DIR.resolve() == (ROOT / "fastvit" / "recipes").resolve()
    tomllib = pytest.importorskip("tomllib")                                          # Python >= 3.11
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "fastvit.recipes" in tool["packages"]
    globs = tool["package-data"]["fastvit.recipes"]
    assert all(any(p.match(g) for g in globs) for p in FILES)


def test_augmentation_strength_is_a_pure_monotone_function_of_the_planned_epochs():
    from fastvit.settings import ConfigError
    from fastvit.train.recipe_scale import randaug_magnitude, strength, strength_for_epochs

    epochs = [0.5, 1, 3, 5, 10, 20, 45, 90, 150, 300, 500]
    got = [strength_for_epochs(e) for e in epochs]
    assert got == [strength_for_epochs(e) for e in epochs]                            # pure
    for key in ("randaug", "mix_prob", "drop_path"):
        ends = [g[key][1] for g in got]
        assert ends == sorted(ends), key                                               # never weaker with more epochs
        assert all(g[key][0] == 0.0 for g in got)                                      # ramps from 0, as aug_at does
    # <= 3 epochs: off (the CPU recipe's regime)
    assert all(g["randaug"][1] == g["mix_prob"][1] == g["drop_path"][1] == 0.0 for g in got[:3])
    # >= 90 epochs: big_vision's ViT-S/16 (randaug(2,10) = full range, mixup p 0.2 on every batch, no cutmix)
    full = {"randaug": (0.0, 30.0), "randaug_ops": 2, "mixup": 0.2, "cutmix": 0.0, "mix_prob": (0.0, 1.0),
            "drop_path": (0.0, 0.0)}
    assert got[7:] == [full] * 4
    assert 0 < strength(20) < 1 and strength(20) == pytest.approx(0.5578, abs=1e-4)   # log-linear between
    assert strength_for_epochs(300, embed_dim=768)["drop_path"] == (0.0, 0.1)          # ViT-B: AugReg's stochastic depth
    assert randaug_magnitude(10) == 30.0 and randaug_magnitude(15) == 30.0 and randaug_magnitude(5) == 15.0
    # the dict is settings a config takes as they are
    for g in got:
        cfg = make_config("gpu", g)
        assert cfg.augment.randaug == g["randaug"] and cfg.augment.mix_prob == g["mix_prob"]
    for bad in (0, -1, float("nan"), float("inf"), "20"):
        with pytest.raises(ConfigError, match="planned epochs"):
            strength_for_epochs(bad)
