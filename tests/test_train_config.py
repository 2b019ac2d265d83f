"""TrainConfig: nine sections, one strict loader (fastvit.settings.from_dict), flags generated from the
fields, YAML nested or flat, old flat keys, old flag names and the old sections (before keep / optim /
augment / growth were split out of schedule) still meaning the same setting."""
from __future__ import annotations

import copy
import json
import re

import pytest

from fastvit.data import DataError, LoaderOptions
from fastvit.models.configs import ViTConfig, model_config
from fastvit.settings import ConfigError
from fastvit.train.cli import build_parser, config_from_args, main
from fastvit.train.config import PRESETS, TrainConfig, given_settings, make_config

# the 54 fields of the flat TrainConfig of 7688800 (keys of its config.json files), in order
OLD_KEYS = ("data out recipe model depth embed_dim num_heads patch_size device backend workers seed hours minutes "
            "epochs final_res curriculum curriculum_stages keep_schedule keep_min keep_full_from keep_cycles "
            "keep_step keep_splits batch_size const_tokens max_batch lr_scaling opt lr warmup lr_decay "
            "weight_decay clip_grad label_smoothing mixup cutmix mix_prob randaug randaug_ops drop_path ema "
            "ema_halflife compile amp ckpt_minutes ckpt_every_steps evals eval_images log_every replan_tol "
            "probe_iters progress baseline_res").split()

# every option of the hand-written parser of 7688800 (git show 7688800:fastvit/train/cli.py): the
# arguments it is given here, and the attribute path and value it must land on
OLD_FLAGS = [
    (["--data", "/d"], "data.root", "/d"),
    (["--out", "runs/x"], "run.out", "runs/x"),
    (["--hours", "2"], "budget.hours", 2.0),
    (["--minutes", "3"], "budget.minutes", 3.0),
    (["--epochs", "4"], "budget.epochs", 4.0),
    (["--recipe", "baseline"], "run.recipe", "baseline"),
    (["--model", "vit_base_plain"], "model.name", "vit_base_plain"),
    (["--depth", "5"], "model.depth", 5),
    (["--embed-dim", "96"], "model.embed_dim", 96),
    (["--num-heads", "3"], "model.num_heads", 3),
    (["--patch-size", "8"], "model.patch_size", 8),
    (["--device", "cuda:1"], "run.device", "cuda:1"),
    (["--backend", "ffcv"], "data.backend", "ffcv"),
    (["--workers", "7"], "data.workers", 7),
    (["--seed", "11"], "run.seed", 11),
    (["--final-res", "160"], "data.final_res", 160),
    (["--curriculum", "64:0.5,128:0.5"], "data.curriculum", "64:0.5,128:0.5"),
    (["--curriculum-stages", "2"], "data.curriculum_stages", 2),
    (["--keep-schedule", "cyclic"], "keep.keep_schedule", "cyclic"),
    (["--keep-min", "0.25"], "keep.keep_min", 0.25),
    (["--keep-full-from", "0.7"], "keep.keep_full_from", 0.7),
    (["--keep-cycles", "6"], "keep.keep_cycles", 6),
    (["--batch-size", "128"], "schedule.batch_size", 128),
    (["--const-tokens"], "schedule.const_tokens", True),
    (["--no-const-tokens"], "schedule.const_tokens", False),
    (["--max-batch", "512"], "schedule.max_batch", 512),
    (["--lr", "0.004"], "optim.lr", 0.004),
    (["--lr-scaling", "linear"], "optim.lr_scaling", "linear"),
    (["--lr-decay", "cosine"], "optim.lr_decay", "cosine"),
    (["--warmup", "0.1"], "optim.warmup", 0.1),
    (["--weight-decay", "0.02"], "optim.weight_decay", 0.02),
    (["--clip-grad", "0"], "optim.clip_grad", 0.0),
    (["--label-smoothing", "0.2"], "augment.label_smoothing", 0.2),
    (["--mixup", "0.5"], "augment.mixup", 0.5),
    (["--cutmix", "0.4"], "augment.cutmix", 0.4),
    (["--mix-prob", "0.1,0.9"], "augment.mix_prob", (0.1, 0.9)),
    (["--mix-prob", "0.3"], "augment.mix_prob", (0.3, 0.3)),
    (["--randaug", "0,9"], "augment.randaug", (0.0, 9.0)),
    (["--drop-path", "0.05,0.2"], "augment.drop_path", (0.05, 0.2)),
    (["--ema"], "optim.ema", True),
    (["--no-ema"], "optim.ema", False),
    (["--compile"], "run.compile", True),
    (["--no-compile"], "run.compile", False),
    (["--amp"], "run.amp", True),
    (["--no-amp"], "run.amp", False),
    (["--ckpt-minutes", "2.5"], "run.ckpt_minutes", 2.5),
    (["--ckpt-every-steps", "9"], "run.ckpt_every_steps", 9),
    (["--evals", "5"], "run.evals", 5),
    (["--log-every", "3"], "run.log_every", 3),
    (["--baseline-res", "128"], "data.baseline_res", 128),
    (["--progress"], "run.progress", True),
    (["--no-progress"], "run.progress", False),
]


def _at(cfg, path: str):
    for k in path.split("."):
        cfg = getattr(cfg, k)
    return cfg


def _cfg(argv):
    return config_from_args(build_parser().parse_args(["--preset", "gpu", *argv]))


@pytest.mark.parametrize("argv, path, value", OLD_FLAGS, ids=[" ".join(a) for a, _, _ in OLD_FLAGS])
def test_every_old_flag_lands_on_its_setting(argv, path, value):
    cfg = _cfg(argv)
    assert _at(cfg, path) == value
    assert _at(_cfg([]), path) != value or argv[0] in ("--const-tokens", "--ema", "--progress")  # it did change


def test_every_old_option_string_still_exists():
    """All 50 options of the old parser, by name; the table above sets each config one."""
    old = ("--data --out --hours --minutes --epochs --resume --overwrite --preset --config --recipe --model --depth "
           "--embed-dim --num-heads --patch-size --device --backend --workers --seed --final-res --curriculum "
           "--curriculum-stages --keep-schedule --keep-min --keep-full-from --keep-cycles --batch-size --const-tokens "
           "--max-batch --lr --lr-scaling --lr-decay --warmup --weight-decay --clip-grad --label-smoothing --mixup "
           "--cutmix --mix-prob --randaug --drop-path --ema --compile --amp --ckpt-minutes --ckpt-every-steps "
           "--evals --log-every --baseline-res --progress").split()
    negatable = ("--const-tokens", "--ema", "--compile", "--amp", "--progress")
    flags = {s for a in build_parser()._actions for s in a.option_strings}
    assert len(old) == 50 and set(old) | {"--no-" + f[2:] for f in negatable} <= flags
    tabled = {a[0] for a, _, _ in OLD_FLAGS}
    assert set(old) - tabled == {"--resume", "--overwrite", "--preset", "--config"}
    args = build_parser().parse_args(["--resume", "--overwrite", "--preset", "cpu", "--config", "x.yaml"])
    assert args.resume and args.overwrite and args.preset == "cpu" and args.config == "x.yaml"


def test_budget_flags_are_mutually_exclusive_and_bad_values_exit_2(capsys):
    for argv in (["--hours", "1", "--minutes", "2"], ["--keep-schedule", "zigzag"], ["--mix-prob", "1,2,3"],
                 ["--lr", "fast"], ["--order", "backwards"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv)
        assert e.value.code == 2, argv
    capsys.readouterr()


def test_loader_and_model_knobs_reach_their_sections():
    cfg = _cfg(["--order", "quasi_random", "--batches-ahead", "5", "--no-ffcv-jit", "--dali-reader", "webdataset",
                "--gpu-mem-share", "0.25", "--src", "/jpegs", "--mlp-ratio", "3", "--pos-embed", "sincos",
                "--no-qkv-bias", "--dwconv-impl", "taps"])
    kw = cfg.data.loader_kwargs()
    assert kw["order"] == "quasi_random" and kw["batches_ahead"] == 5 and kw["ffcv_jit"] is False
    assert kw["dali_reader"] == "webdataset" and kw["gpu_mem_share"] == 0.25 and kw["src"] == "/jpegs"
    assert "res_schedule" not in kw and LoaderOptions.from_kwargs(kw) == cfg.data.loader
    ov = cfg.model.overrides()
    assert ov == {"patch_size": 16, "mlp_ratio": 3.0, "pos_embed": "sincos", "qkv_bias": False, "dwconv_impl": "taps"}
    vit = model_config(cfg.model.name, **ov)
    assert (vit.mlp_ratio, vit.pos_embed, vit.qkv_bias, vit.dwconv_impl, vit.embed_dim) == (3.0, "sincos", False, "taps", 384)
    # every ViTConfig field a user may set is a model setting; the trainer's own are not
    mine = {"img_size", "num_classes", "drop_path_rate", "mean", "std"}
    fields = set(ViTConfig.__dataclass_fields__) - mine
    assert set(TrainConfig().model.__dataclass_fields__) == fields | {"name"}
    assert not mine & set(TrainConfig.leaf_keys())
    with pytest.raises(ConfigError, match="--gpu-mem-share"):
        _cfg(["--gpu-mem-share", "2"])
    with pytest.raises(ConfigError, match="--head must be gap or token"):
        TrainConfig.from_dict({"model": {"head": "cls"}})


def test_help_is_the_field_docs_without_default_none():
    text = build_parser().format_help()
    assert "(default: None)" not in text and "default: None" not in text
    helps = {a.dest: a.help for a in build_parser()._actions}
    assert helps["keep_min"] == "lowest kept-patch rate (default: 0.5)"
    assert helps["mix_prob"] == "mixup/cutmix probability, 'start,end' (linear in progress) (default: 0,0.8)"
    assert helps["ema"] == "keep an EMA of the weights (evaluated beside them) (default: on)"
    assert helps["data"] == "fastvit-prep output dir (holds manifest.json)"
    assert helps["depth"] == "transformer blocks (default: the variant's)"
    assert helps["dali_reader"].startswith("DALI reader: index")
    for key in TrainConfig.leaf_keys():
        if key in helps:
            assert helps[key] and not helps[key].startswith("("), key   # every flag has its doc
    assert {"data", "model"} <= set(helps) and not {"root", "name"} & set(helps)


def test_from_dict_nested_and_flat_are_one_config():
    flat = TrainConfig.from_dict({"data": "/d", "model": "vit_tiny_local", "lr": 0.01, "depth": 2, "order": "sequential",
                                  "minutes": 5, "out": "r", "mix_prob": 0.5})
    nested = TrainConfig.from_dict({"data": {"root": "/d", "loader": {"order": "sequential"}},
                                    "model": {"name": "vit_tiny_local", "depth": 2}, "optim": {"lr": 0.01},
                                    "augment": {"mix_prob": [0.5, 0.5]}, "budget": {"minutes": 5}, "run": {"out": "r"}})
    old_nested = TrainConfig.from_dict({"data": {"root": "/d", "loader": {"order": "sequential"}},   # before the split
                                        "model": {"name": "vit_tiny_local", "depth": 2}, "schedule": {"lr": 0.01,
                                        "mix_prob": [0.5, 0.5]}, "budget": {"minutes": 5}, "run": {"out": "r"}})
    given = {"data": {"root": "/d", "loader": {}}, "model": {"name": "vit_tiny_local"}, "depth": 2,
             "schedule": {"lr": 0.01}, "order": "sequential", "budget": {"minutes": 5}, "out": "r", "mix_prob": (0.5, 0.5)}
    before = copy.deepcopy(given)
    mixed = TrainConfig.from_dict(given)
    assert given == before                                      # the caller's dicts are not merged into
    assert flat == nested == old_nested == mixed
    assert flat.data.root == "/d" and flat.model.name == "vit_tiny_local" and flat.data.loader.order == "sequential"
    assert flat.budget_s == 300.0 and flat.has_budget and flat.budget.given and flat.budget.seconds == 300.0
    assert TrainConfig.from_dict({"epochs": 2}).budget_s is None and not TrainConfig().has_budget


def test_unknown_keys_raise_one_error_type_naming_the_key_and_a_close_match():
    cases = [({"lrr": 1.0}, "unknown config key(s) lrr (did you mean lr?)"),
             ({"schedule": {"keep_mim": 0.3}}, "unknown config key(s) schedule.keep_mim (did you mean keep_min?)"),
             ({"keep": {"keep_mim": 0.3}}, "unknown config key(s) keep.keep_mim (did you mean keep_min?)"),
             ({"optim": {"lrr": 1.0}}, "unknown config key(s) optim.lrr (did you mean lr?)"),
             ({"growth": {"mod": "manual"}}, "unknown config key(s) growth.mod (did you mean mode?)"),
             ({"model": {"lr": 0.1}}, "unknown config key(s) model.lr"),      # only the old schedule's keys move
             ({"optim": {"keep_min": 0.5}}, "unknown config key(s) optim.keep_min"),
             ({"data": {"loader": {"ordr": "random"}}}, "data.loader.ordr (did you mean order?)"),
             ({"zzz": 1}, "unknown config key(s) zzz"),
             ({"run": 3}, "run must be a mapping of settings")]
    for d, msg in cases:
        with pytest.raises(ConfigError) as e:
            TrainConfig.from_dict(d)
        assert msg in str(e.value), (d, str(e.value))
    with pytest.raises(ConfigError, match=r"unknown model config key\(s\) dept \(did you mean depth\?\)"):
        ViTConfig.from_dict({"dept": 3})
    with pytest.raises(ConfigError, match=r"unknown model config key\(s\) bogus"):
        model_config("vit_tiny_local", bogus=1)
    # the data package refuses with its own DataError (its callers catch that), from the same check
    with pytest.raises(DataError, match=r"unknown loader option\(s\) batches_ahaed \(did you mean batches_ahead\?\)"):
        LoaderOptions.from_kwargs({"batches_ahaed": 2})
    with pytest.raises(DataError, match="order must be random, quasi_random or sequential"):
        LoaderOptions.from_kwargs({"order": "x"})
    from fastvit.data_prep.options import PrepError, PrepOptions     # and so does prep, with its PrepError

    with pytest.raises(PrepError, match=r"unknown option\(s\) qualty \(did you mean quality\?\)"):
        PrepOptions.make(qualty=80)
    assert issubclass(ConfigError, ValueError)


def test_round_trip_exact_and_old_flat_config_json_loads():
    cfg = make_config("cpu", dict(data="/d", out="runs/r", minutes=3, order="quasi_random", head="gap", randaug=(0, 9),
                                  compile=True, workers=2, gpu_mem_share=0.3, pos_embed="sincos"))
    d = cfg.to_dict()
    assert set(d) == {"data", "model", "keep", "schedule", "optim", "augment", "growth", "budget", "run"}
    assert d["data"]["loader"]["order"] == "quasi_random"
    assert "res_schedule" not in d["data"]["loader"]
    assert TrainConfig.from_dict(d) == cfg
    assert TrainConfig.from_dict(json.loads(json.dumps(d))) == cfg            # as read back from config.json
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()
    # a config.json written by the flat TrainConfig (7688800): every key is a leaf, same value
    old = {k: None for k in OLD_KEYS}
    old.update(data="/d", out="runs/old", recipe="fastvit", model="vit_tiny_local", depth=4, patch_size=16, seed=0,
               minutes=3.0, curriculum="64:0.5,96:0.5", curriculum_stages=3, keep_schedule="linear", keep_min=1.0,
               keep_full_from=0.8, keep_cycles=4, keep_step=0.125, keep_splits=2, batch_size=64, const_tokens=False,
               max_batch=256, lr_scaling="sqrt", opt="adamw", lr=0.002, warmup=0.05, lr_decay="linear",
               weight_decay=0.05, clip_grad=1.0, label_smoothing=0.1, mixup=0.8, cutmix=1.0, mix_prob=[0.0, 0.0],
               randaug=[0.0, 0.0], randaug_ops=2, drop_path=[0.0, 0.0], ema=True, ema_halflife=0.05,
               ckpt_minutes=5.0, ckpt_every_steps=0, evals=2, eval_images=1000, log_every=10, replan_tol=0.1,
               probe_iters=1, progress=True, final_res=96)
    assert len(old) == len(OLD_KEYS) == 54
    got = TrainConfig.from_dict(old)
    assert got == make_config("cpu-d4", dict(data="/d", out="runs/old", minutes=3))   # the cpu preset of then
    paths = TrainConfig.leaf_keys()
    for k, v in old.items():
        assert _at(got, ".".join(paths[k])) == (tuple(v) if isinstance(v, list) else v), k


def test_yaml_nested_or_flat_between_preset_and_overrides(tmp_path):
    nested, flat = tmp_path / "nested.yaml", tmp_path / "flat.yaml"
    nested.write_text("optim:\n  lr: 0.02\naugment:\n  mix_prob: [0.1, 0.4]\nmodel:\n  depth: 3\n  name: vit_tiny_plain\n"
                      "data:\n  root: /yaml\n  loader:\n    batches_ahead: 6\nbudget:\n  epochs: 2\n")
    flat.write_text("lr: 0.02\nmix_prob: [0.1, 0.4]\ndepth: 3\nmodel: vit_tiny_plain\ndata: /yaml\n"
                    "batches_ahead: 6\nepochs: 2\n")
    a = make_config("test", {"lr": None, "out": "o"}, str(nested))
    b = make_config("test", {"out": "o"}, str(flat))
    assert a == b
    assert a.optim.lr == 0.02 and a.model.depth == 3 and a.model.embed_dim == 32     # YAML over preset, rest kept
    assert a.model.name == "vit_tiny_plain" and a.data.root == "/yaml" and a.data.loader.batches_ahead == 6
    assert a.augment.mix_prob == (0.1, 0.4) and a.budget.epochs == 2 and a.run.progress is False
    c = make_config("test", {"lr": 0.5, "data": "/cli", "batches_ahead": 1}, str(nested))  # explicit over YAML
    assert c.optim.lr == 0.5 and c.data.root == "/cli" and c.data.loader.batches_ahead == 1 and c.model.depth == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("schedule:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match="schedule.lrr"):
        make_config("test", {}, str(bad))
    bad.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match="optim.lrr"):
        make_config("test", {}, str(bad))
    bad.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        make_config("test", {}, str(bad))
    for name, preset in PRESETS.items():          # presets are flat keys of the one layout
        assert make_config(name, {}) == TrainConfig.from_dict(preset)


def test_cli_config_errors_are_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  evalz: 1\n")
    assert main(["--data", str(tmp_path), "--epochs", "1", "--config", str(bad), "--preset", "test"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fastvit-train: error: unknown config key(s) run.evalz (did you mean evals?)"]
    assert main(["--data", str(tmp_path), "--epochs", "1", "--keep-min", "0", "--preset", "test"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--keep-min" in err[0]


def test_leaf_names_are_unique_and_cover_the_old_keys():
    keys = TrainConfig.leaf_keys()
    assert set(OLD_KEYS) <= set(keys)
    assert keys["data"] == keys["root"] == ("data", "root") and keys["model"] == keys["name"] == ("model", "name")
    assert keys["order"] == ("data", "loader", "order") and keys["lr"] == ("optim", "lr")
    assert keys["growth"] == ("growth", "mode") and keys["keep_min"] == ("keep", "keep_min")


def test_yaml_out_and_device_are_honoured_by_the_cli(tmp_path, monkeypatch):
    """A YAML `out:` is the run dir (the runs/<recipe> default applies only when nothing sets it), and a
    YAML `device:` picks the default preset as the flag would."""
    from fastvit.train import cli

    monkeypatch.setattr("fastvit.data.backends.default_device", lambda: "cuda")   # a GPU machine
    y = tmp_path / "s.yaml"
    y.write_text("run: {out: runs/from-yaml, device: cpu}\n")
    cfg = cli.config_from_args(cli.build_parser().parse_args(["--config", str(y)]))
    assert cfg.run.out == "runs/from-yaml"
    assert cfg.model.name == "vit_tiny_local"                          # the cpu preset, chosen by the YAML
    cfg = cli.config_from_args(cli.build_parser().parse_args(["--recipe", "baseline", "--device", "cpu"]))
    assert cfg.run.out == "runs/baseline"
    flat = tmp_path / "f.yaml"
    flat.write_text("out: runs/flat\n")
    assert cli.config_from_args(cli.build_parser().parse_args(["--config", str(flat), "--device", "cpu"])).run.out \
        == "runs/flat"
    assert cli.config_from_args(cli.build_parser().parse_args(["--config", str(flat), "--out", "x"])).run.out == "x"


UNITS = ("hours", "minutes", "epochs")


@pytest.mark.parametrize("file_unit", UNITS)
@pytest.mark.parametrize("flag_unit", UNITS)
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "flat"])
def test_a_budget_flag_replaces_the_files_budget_in_any_unit(tmp_path, file_unit, flag_unit, nested):
    """fastvit-search's hint, tried with a shorter budget: `--config best.yaml --minutes 0.5` where best.yaml
    carries `budget: hours:` (or any unit, nested or flat, as the sweep's variant configs are)."""
    best = tmp_path / "best.yaml"
    best.write_text(f"data:\n  root: {tmp_path}\nbudget:\n  {file_unit}: 0.26667\nrun:\n  device: cpu\n"
                    "model:\n  name: vit_tiny_plain\n  depth: 2\n" if nested else
                    f"data: {tmp_path}\n{file_unit}: 0.26667\ndevice: cpu\nmodel: vit_tiny_plain\ndepth: 2\n")
    cfg = config_from_args(build_parser().parse_args(["--config", str(best), f"--{flag_unit}", "0.5"]))
    assert {u: getattr(cfg.budget, u) for u in UNITS} == {u: 0.5 if u == flag_unit else None for u in UNITS}
    assert cfg.model.depth == 2 and cfg.model.name == "vit_tiny_plain" and cfg.data.root == str(tmp_path)
    assert config_from_args(build_parser().parse_args(["--config", str(best)])).budget.__dict__[file_unit] == 0.26667
    # the same rule between the file and the preset, and in make_config / given_settings directly
    assert make_config("cpu", {flag_unit: 0.5}, str(best)).budget == cfg.budget
    assert given_settings({flag_unit: 0.5}, str(best))["budget"] == {flag_unit: 0.5}
    # two budgets in one layer are still refused (one line, exit 2 from the CLI)
    two = tmp_path / "two.yaml"
    two.write_text(f"budget: {{{file_unit}: 1, {UNITS[UNITS.index(file_unit) - 1]}: 2}}\n")
    with pytest.raises(ConfigError, match="give one budget"):
        make_config("test", {}, str(two))


def test_cli_runs_config_with_a_shorter_budget_flag(tmp_path, capsys, monkeypatch):
    """The whole command line as a user types it gets past the settings (it stops at the missing data)."""
    best = tmp_path / "best.yaml"
    best.write_text(f"data:\n  root: {tmp_path / 'nodata'}\nbudget:\n  hours: 0.26667\nrun:\n  device: cpu\n")
    assert main(["--config", str(best), "--minutes", "0.5", "--preset", "test", "--out", str(tmp_path / "r")]) != 0
    err = capsys.readouterr().err
    assert "give one budget" not in err and len(err.strip().splitlines()) == 1


def test_flag_over_file_over_preset_for_every_setting(tmp_path):
    """Three full recipes as the three layers: the preset (gpu), a --config file (cpu.yaml, every setting
    written out) and a flag for every setting (the test recipe's values; None = not given)."""
    from fastvit.settings import leaves
    from fastvit.train.config import RECIPES_DIR

    file_cfg = make_config("cpu", {})
    test_cfg = make_config("test", {})
    flags = {}
    for path, f, _ in leaves(TrainConfig):
        flags[".".join(path)] = _at(test_cfg, ".".join(path))
    keys = TrainConfig.leaf_keys()
    by_path = {".".join(p): k for k, p in sorted(keys.items(), key=lambda kv: kv[0] != kv[1][-1])}
    got = make_config("gpu", {by_path[p]: v for p, v in flags.items()}, str(RECIPES_DIR / "cpu.yaml"))
    for p, v in flags.items():
        want = v if v is not None else _at(file_cfg, p)
        assert _at(got, p) == want, p
    # the file alone: every setting is the file's, none the preset's
    assert make_config("gpu", {}, str(RECIPES_DIR / "cpu.yaml")) == file_cfg
    # a partial file: what it gives over the preset, the rest the preset's
    part = tmp_path / "part.yaml"
    part.write_text("optim: {lr: 0.007}\nmodel: {depth: 3}\n")
    cfg = make_config("cpu", {"depth": 5}, str(part))
    assert cfg.optim.lr == 0.007 and cfg.model.depth == 5 and cfg.schedule.batch_size == file_cfg.schedule.batch_size


# ------------------------------------------------------------------------------------------------------
# keep / optim / augment / growth: split out of schedule; every old key, flag and layout still reads

SPLIT = ("keep", "optim", "augment", "growth")


def _old_layout(d: dict) -> dict:
    """A nested config as it was written before the split (config.json, a checkpoint's config, a recipe):
    one `schedule` section holding keep / optim / augment / growth, growth's mode under the key `growth`."""
    d = copy.deepcopy(d)
    sched = d.pop("schedule")
    for sec in SPLIT:
        sched.update({("growth" if (sec, k) == ("growth", "mode") else k): v for k, v in d.pop(sec).items()})
    return {**d, "schedule": sched}


def test_the_split_sections_hold_the_old_schedule_leaves_under_their_old_keys_and_flags():
    keys = TrainConfig.leaf_keys()
    want = {"keep": "keep_schedule keep_min keep_full_from keep_cycles keep_step keep_splits",
            "schedule": "tokens batch_size const_tokens max_batch",
            "optim": "opt lr lr_scaling warmup lr_decay weight_decay clip_grad ema ema_halflife",
            "augment": "label_smoothing mixup cutmix mix_prob randaug randaug_ops drop_path",
            "growth": "growth growth_depth growth_opt growth_window growth_score_images"}
    for sec, names in want.items():
        for k in names.split():
            assert keys[k][0] == sec, k
    assert len(_old_layout(TrainConfig().to_dict())["schedule"]) == 31          # the old ScheduleConfig's 31 fields
    flags = {s for a in build_parser()._actions for s in a.option_strings}
    assert {"--growth", "--growth-depth", "--growth-opt", "--growth-window", "--growth-score-images",
            "--tokens", "--keep-step", "--keep-splits", "--opt", "--randaug-ops", "--ema-halflife"} <= flags
    assert "--mode" not in flags


@pytest.mark.parametrize("argv, path, value", [
    (["--growth", "manual"], "growth.mode", "manual"),
    (["--growth-depth", "0.25,1"], "growth.growth_depth", (0.25, 1.0)),
    (["--growth-opt", "fresh"], "growth.growth_opt", "fresh"),
    (["--growth-window", "0.1"], "growth.growth_window", 0.1),
    (["--growth-score-images", "64"], "growth.growth_score_images", 64),
    (["--keep-step", "0.25"], "keep.keep_step", 0.25),
    (["--keep-splits", "3"], "keep.keep_splits", 3),
    (["--tokens", "32:0.3,16:0.7"], "schedule.tokens", "32:0.3,16:0.7"),
    (["--opt", "sgd"], "optim.opt", "sgd"),
    (["--ema-halflife", "0.1"], "optim.ema_halflife", 0.1),
    (["--randaug-ops", "3"], "augment.randaug_ops", 3),
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_the_newer_schedule_flags_land_in_their_sections(argv, path, value):
    cfg = _cfg(argv)
    assert _at(cfg, path) == value and _at(_cfg([]), path) != value
    dest = next(a.dest for a in build_parser()._actions if argv[0] in a.option_strings)
    assert dest == argv[0][2:].replace("-", "_")                               # the flag's name is its flat key
    assert _at(TrainConfig.from_dict({dest: value}), path) == value


def test_new_old_and_flat_layouts_are_one_config(tmp_path):
    """New sections, the old schedule section (config.json, a checkpoint, --config, a recipe of before the
    split) and flat keys: the same TrainConfig, and every flag over any of them."""
    cfg = make_config("cpu", {"lr": 3e-3, "keep_min": 0.25, "growth": "manual", "mixup": 0.3, "batch_size": 32,
                              "ema": False, "growth_depth": 0.5, "randaug": (0, 9), "tokens": "32:0.3,16:0.7"})
    new = cfg.to_dict()
    old = _old_layout(new)
    assert set(old) == {"data", "model", "schedule", "budget", "run"} and old["schedule"]["growth"] == "manual"
    flat = {k: v for sec in ("keep", "schedule", "optim", "augment") for k, v in new[sec].items()}
    flat.update({("growth" if k == "mode" else k): v for k, v in new["growth"].items()})
    for d in (new, old, json.loads(json.dumps(old)), {**{k: new[k] for k in ("data", "model", "budget", "run")}, **flat}):
        assert TrainConfig.from_dict(d) == cfg
    assert (cfg.optim.lr, cfg.keep.keep_min, cfg.growth.mode, cfg.augment.mixup, cfg.schedule.batch_size) == \
        (3e-3, 0.25, "manual", 0.3, 32)
    # a --config YAML in either layout (and flat), under flags
    import yaml

    files = {}
    for name, d in (("new", new), ("old", old)):
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(json.loads(json.dumps(d))))
    (tmp_path / "flat.yaml").write_text("lr: 3.0e-3\ngrowth: manual\nkeep_min: 0.25\n")
    for f in files.values():
        assert make_config("gpu", {}, str(f)) == cfg
        assert make_config("gpu", {"lr": 0.01, "growth": "auto"}, str(f)).optim.lr == 0.01
        args = build_parser().parse_args(["--config", str(f), "--growth", "none", "--lr", "0.02"])
        got = config_from_args(args)
        assert (got.growth.mode, got.optim.lr, got.keep.keep_min) == ("none", 0.02, 0.25)
    got = make_config("test", {}, str(tmp_path / "flat.yaml"))
    assert (got.optim.lr, got.growth.mode, got.keep.keep_min) == (3e-3, "manual", 0.25)
    assert make_config("test", {}, str(tmp_path / "flat.yaml")) == make_config("test", {"lr": 3e-3, "growth": "manual",
                                                                                       "keep_min": 0.25})
    # nested growth, the new section spelled out
    assert TrainConfig.from_dict({"growth": {"mode": "manual"}}).growth.mode == "manual"
    assert TrainConfig.from_dict({"growth": "manual"}) == TrainConfig.from_dict({"growth": {"mode": "manual"}})
    # both layouts in one file: the later key wins, as for any setting
    assert TrainConfig.from_dict({"schedule": {"lr": 0.1}, "optim": {"lr": 0.2}}).optim.lr == 0.2
    with pytest.raises(ConfigError, match="--growth must be none, manual or auto"):
        TrainConfig.from_dict({"schedule": {"growth": "sometimes"}})


def test_every_recipe_in_the_old_layout_is_its_preset(tmp_path):
    """A recipe (or a sweep's variant config) written before the split reads as the recipe file does now."""
    import yaml

    from fastvit.train.config import read_recipe

    for name in PRESETS:
        old = _old_layout(make_config(name, {}).to_dict())
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(json.loads(json.dumps(old)), sort_keys=False))
        assert TrainConfig.from_dict(read_recipe(path)) == make_config(name, {}), name
        assert make_config("test", {}, str(path)) == make_config(name, {}), name


def test_resume_of_a_checkpoint_or_config_json_in_the_old_layout(tmp_path):
    """--resume (and fastvit-eval) read the checkpoint's config dict: one written before the split loads
    to the same config, and the run's own settings win over the flags as before."""
    from fastvit.train import rundir
    from fastvit.train.checkpoint import Checkpoint
    from fastvit.train.loop import _saved_config

    cfg = make_config("test", {"out": str(tmp_path / "run"), "lr": 4e-3, "growth": "manual", "mix_prob": (0, 0.5),
                               "minutes": 1})
    old = _old_layout(cfg.to_dict())
    run = tmp_path / "run"
    Checkpoint(config=old, model={}, opt={}, plan={}, step=3, counted_s=1.5, rng={}).write(run)
    ck = rundir.open_for_resume(run, lambda s: None)
    assert ck is not None and ck.config == old
    said = []
    here = make_config("test", {"out": str(tmp_path / "moved"), "lr": 0.5, "progress": False})
    got = _saved_config(ck.config, here, ["--lr"], said.append)
    assert got.optim.lr == 4e-3 and got.growth.mode == "manual" and got.augment.mix_prob == (0.0, 0.5)
    assert got.run.out == str(tmp_path / "moved") and got.run.progress is False
    assert _saved_config(ck.config, cfg, [], said.append) == cfg
    assert said == ["warning: ignored with --resume (the run's saved config wins): --lr"]
    # a run killed before its first checkpoint: its config.json, old layout
    (run / "config.json").write_text(json.dumps(old))
    assert TrainConfig.from_dict(rundir.saved_config(run)) == cfg


def test_variant_files_in_old_new_and_flat_layouts_give_the_same_overrides(tmp_path):
    """fastvit-search's best.yaml (and any NAME=FILE.yaml variant) read by TrainConfig.nest, any layout."""
    import yaml

    from fastvit.sweep.variants import check

    cfg = make_config("cpu", {"lr": 3e-3, "growth": "manual", "keep_min": 0.5, "depth": 2, "data": "/d", "hours": 1})
    want = {"lr": 3e-3, "growth": "manual", "keep_min": 0.5, "depth": 2}
    layouts = {"new": cfg.to_dict(), "old": _old_layout(cfg.to_dict())}
    for name, d in layouts.items():
        f = tmp_path / f"{name}.yaml"
        f.write_text(yaml.safe_dump(json.loads(json.dumps(d))))
        ov = check(f"v={f}", "cpu", {}, [64, 96])
        assert {k: ov[k] for k in want} == want, name
        assert not {"data", "hours", "out", "seed"} & set(ov)                  # the run's own stay the sweep's
        assert make_config("cpu", ov).optim == cfg.optim and make_config("cpu", ov).growth == cfg.growth
    part = tmp_path / "part.yaml"
    part.write_text("growth: {mode: auto}\noptim: {lr: 0.01}\nschedule: {keep_min: 0.75, batch_size: 32}\n"
                    "model:\n  embed-dim: 96\n")
    assert check(f"v={part}", "cpu", {}, [64, 96]) == {"growth": "auto", "lr": 0.01, "keep_min": 0.75,
                                                        "batch_size": 32, "embed_dim": 96}
    (tmp_path / "typo.yaml").write_text("optim:\n  lrr: 2\n")
    with pytest.raises(ConfigError, match=r"variant file .*typo.yaml: unknown setting optim.lrr"):
        check(f"v={tmp_path / 'typo.yaml'}", "cpu", {}, [64, 96])


def test_help_groups_are_the_sections_each_with_its_doc():
    parser = build_parser()
    groups = {g.title: g for g in parser._action_groups}
    for sec, cls_doc in (("keep", "patch sampling"), ("schedule", "the batch and token schedule"),
                         ("optim", "the optimizer"), ("augment", "augmentation"), ("growth", "progressive depth")):
        assert sec in groups and groups[sec].description.startswith(cls_doc), sec
    dests = lambda sec: {a.dest for a in groups[sec]._group_actions}                                 # noqa: E731
    assert dests("growth") == {"growth", "growth_depth", "growth_opt", "growth_window", "growth_score_images"}
    assert dests("schedule") == {"tokens", "batch_size", "const_tokens", "max_batch"}
    assert {"lr", "ema", "lr_scaling"} <= dests("optim") and {"mixup", "drop_path"} <= dests("augment")
    text = parser.format_help()
    assert "--growth {none,manual,auto}" in text and not re.search(r"--mode\b", text)
