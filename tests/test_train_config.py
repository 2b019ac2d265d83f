"""TrainConfig: five sections, one strict loader (fastvit.settings.from_dict), flags generated from the
fields, YAML nested or flat, old flat keys and old flag names still meaning the same setting."""
from __future__ import annotations

import copy
import json

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
    (["--keep-schedule", "cyclic"], "schedule.keep_schedule", "cyclic"),
    (["--keep-min", "0.25"], "schedule.keep_min", 0.25),
    (["--keep-full-from", "0.7"], "schedule.keep_full_from", 0.7),
    (["--keep-cycles", "6"], "schedule.keep_cycles", 6),
    (["--batch-size", "128"], "schedule.batch_size", 128),
    (["--const-tokens"], "schedule.const_tokens", True),
    (["--no-const-tokens"], "schedule.const_tokens", False),
    (["--max-batch", "512"], "schedule.max_batch", 512),
    (["--lr", "0.004"], "schedule.lr", 0.004),
    (["--lr-scaling", "linear"], "schedule.lr_scaling", "linear"),
    (["--lr-decay", "cosine"], "schedule.lr_decay", "cosine"),
    (["--warmup", "0.1"], "schedule.warmup", 0.1),
    (["--weight-decay", "0.02"], "schedule.weight_decay", 0.02),
    (["--clip-grad", "0"], "schedule.clip_grad", 0.0),
    (["--label-smoothing", "0.2"], "schedule.label_smoothing", 0.2),
    (["--mixup", "0.5"], "schedule.mixup", 0.5),
    (["--cutmix", "0.4"], "schedule.cutmix", 0.4),
    (["--mix-prob", "0.1,0.9"], "schedule.mix_prob", (0.1, 0.9)),
    (["--mix-prob", "0.3"], "schedule.mix_prob", (0.3, 0.3)),
    (["--randaug", "0,9"], "schedule.randaug", (0.0, 9.0)),
    (["--drop-path", "0.05,0.2"], "schedule.drop_path", (0.05, 0.2)),
    (["--ema"], "schedule.ema", True),
    (["--no-ema"], "schedule.ema", False),
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
                                    "model": {"name": "vit_tiny_local", "depth": 2}, "schedule": {"lr": 0.01,
                                    "mix_prob": [0.5, 0.5]}, "budget": {"minutes": 5}, "run": {"out": "r"}})
    given = {"data": {"root": "/d", "loader": {}}, "model": {"name": "vit_tiny_local"}, "depth": 2,
             "schedule": {"lr": 0.01}, "order": "sequential", "budget": {"minutes": 5}, "out": "r", "mix_prob": (0.5, 0.5)}
    before = copy.deepcopy(given)
    mixed = TrainConfig.from_dict(given)
    assert given == before                                      # the caller's dicts are not merged into
    assert flat == nested == mixed
    assert flat.data.root == "/d" and flat.model.name == "vit_tiny_local" and flat.data.loader.order == "sequential"
    assert flat.budget_s == 300.0 and flat.has_budget and flat.budget.given and flat.budget.seconds == 300.0
    assert TrainConfig.from_dict({"epochs": 2}).budget_s is None and not TrainConfig().has_budget


def test_unknown_keys_raise_one_error_type_naming_the_key_and_a_close_match():
    cases = [({"lrr": 1.0}, "unknown config key(s) lrr (did you mean lr?)"),
             ({"schedule": {"keep_mim": 0.3}}, "unknown config key(s) schedule.keep_mim (did you mean keep_min?)"),
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
    assert set(d) == {"data", "model", "schedule", "budget", "run"} and d["data"]["loader"]["order"] == "quasi_random"
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
    assert got == make_config("cpu", dict(data="/d", out="runs/old", minutes=3))
    paths = TrainConfig.leaf_keys()
    for k, v in old.items():
        assert _at(got, ".".join(paths[k])) == (tuple(v) if isinstance(v, list) else v), k


def test_yaml_nested_or_flat_between_preset_and_overrides(tmp_path):
    nested, flat = tmp_path / "nested.yaml", tmp_path / "flat.yaml"
    nested.write_text("schedule:\n  lr: 0.02\n  mix_prob: [0.1, 0.4]\nmodel:\n  depth: 3\n  name: vit_tiny_plain\n"
                      "data:\n  root: /yaml\n  loader:\n    batches_ahead: 6\nbudget:\n  epochs: 2\n")
    flat.write_text("lr: 0.02\nmix_prob: [0.1, 0.4]\ndepth: 3\nmodel: vit_tiny_plain\ndata: /yaml\n"
                    "batches_ahead: 6\nepochs: 2\n")
    a = make_config("test", {"lr": None, "out": "o"}, str(nested))
    b = make_config("test", {"out": "o"}, str(flat))
    assert a == b
    assert a.schedule.lr == 0.02 and a.model.depth == 3 and a.model.embed_dim == 32     # YAML over preset, rest kept
    assert a.model.name == "vit_tiny_plain" and a.data.root == "/yaml" and a.data.loader.batches_ahead == 6
    assert a.schedule.mix_prob == (0.1, 0.4) and a.budget.epochs == 2 and a.run.progress is False
    c = make_config("test", {"lr": 0.5, "data": "/cli", "batches_ahead": 1}, str(nested))  # explicit over YAML
    assert c.schedule.lr == 0.5 and c.data.root == "/cli" and c.data.loader.batches_ahead == 1 and c.model.depth == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("schedule:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match="schedule.lrr"):
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
    assert keys["order"] == ("data", "loader", "order") and keys["lr"] == ("schedule", "lr")


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
    part.write_text("schedule: {lr: 0.007}\nmodel: {depth: 3}\n")
    cfg = make_config("cpu", {"depth": 5}, str(part))
    assert cfg.schedule.lr == 0.007 and cfg.model.depth == 5 and cfg.schedule.batch_size == file_cfg.schedule.batch_size
