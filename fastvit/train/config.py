"""A run's settings, in nine sections, from the CLI / a YAML file to every part of training.

    cfg.data      DataConfig      where the data is and how it is read (cfg.data.loader: LoaderOptions)
    cfg.model     ModelConfig     the variant and its overrides (cfg.model.overrides())
    cfg.keep      KeepConfig      patch sampling: the kept-patch rate over the run
    cfg.schedule  ScheduleConfig  the batch and token schedule: batch per stage, token size over the run
    cfg.optim     OptimConfig     optimizer, learning rate and its rules, gradient clip, EMA of the weights
    cfg.augment   AugmentConfig   label smoothing, mixup / cutmix, RandAugment, drop path
    cfg.growth    GrowthConfig    progressive depth growth (cfg.growth.mode: --growth)
    cfg.budget    BudgetConfig    exactly one of hours / minutes / epochs, and the re-planning knobs
    cfg.run       RunConfig       run dir, recipe, device, checkpoints, evaluations, logging

Leaf names are unique across sections, so a flat key (`lr`, an old config.json, a preset) and a flag
(`--lr`) name one setting; `data` / `model` / `growth` as strings mean data.root / model.name /
growth.mode. Configs written before keep / optim / augment / growth were split out of `schedule`
(`schedule: {lr: ..., growth: manual}`) still load: `TrainConfig.nest` moves those keys to their
sections. Unknown keys raise one ConfigError (fastvit.settings). A preset is a recipe file
(fastvit/recipes/NAME.yaml, every setting written out); a --config file goes over it and flags over both,
setting by setting (a budget in any unit replaces the budget below it). The resolved config (to_dict) is
saved in the run dir and in every checkpoint.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fastvit.data.base import LoaderOptions
from fastvit.models.configs import ViTConfig
from fastvit.settings import ConfigError, check_choices, from_dict, leaf_paths, setting, to_dict

__all__ = ["AugmentConfig", "BudgetConfig", "ConfigError", "DataConfig", "GrowthConfig", "KeepConfig", "ModelConfig",
           "OptimConfig", "PRESETS", "RunConfig", "ScheduleConfig", "TrainConfig", "make_config", "preset_under"]

@dataclass
class DataConfig:
    """the prepped data and its loaders"""

    root: str = setting("", "fastvit-prep output dir (holds manifest.json)", flag="--data")
    backend: str | None = setting(None, "loader backend; auto (the default): DALI GPU decode, else gpu_resident "
                                        "on cuda; DALI, else FFCV, else torchvision on cpu",
                                  choices=("auto", "ffcv", "dali", "torchvision", "gpu_resident"))
    workers: int | None = setting(None, "loader worker processes (default: the CPUs this process may use)")
    final_res: int | None = setting(None, "last curriculum resolution and the evaluation resolution "
                                          "(default: the data's largest; the cpu preset: 96)")
    curriculum: str | None = setting(None, "res:share,... e.g. 64:0.4,128:0.35,224:0.25 (default: a ladder "
                                           "of --curriculum-stages resolutions)")
    curriculum_stages: int = setting(3, "resolutions of the default curriculum ladder")
    baseline_res: int | None = setting(None, "--recipe baseline: fixed resolution (default: the final res)")
    loader: LoaderOptions = setting(default_factory=LoaderOptions, help="backend knobs")

    def loader_kwargs(self) -> dict:
        """The loader knobs as keyword arguments of CurriculumLoader / make_loader / make_val_loader."""
        return to_dict(self.loader)


_TRAINER_SET = ("img_size", "num_classes", "drop_path_rate", "mean", "std")   # the trainer's, not the user's


@dataclass
class _ModelBase:
    """the model variant and its overrides (None: the variant's value)"""

    name: str = setting("vit_small_local", "vit_{tiny,small,base}_{local,plain}, or auto: the shape this budget "
                                           "trains best here, from measured speed and a scaling law "
                                           "(fastvit.train.auto)", flag="--model")
    patch_size: int = setting(16, "patch side in pixels")

    def overrides(self) -> dict:
        """The ViTConfig fields given (patch_size always): create_model(name, **overrides())."""
        return {f.name: v for f in dataclasses.fields(self) if f.name != "name"
                for v in [getattr(self, f.name)] if v is not None}


# every ViTConfig field a user may override, typed `T | None`, with ViTConfig's own doc and choices
_VIT_TYPES = typing.get_type_hints(ViTConfig)
ModelConfig = dataclasses.make_dataclass(
    "ModelConfig",
    [(f.name, _VIT_TYPES[f.name] | None, setting(None, f"{f.metadata.get('help', f.name)} (default: the variant's)",
                                               choices=f.metadata.get("choices")))
     for f in dataclasses.fields(ViTConfig) if f.name not in _TRAINER_SET + ("patch_size",)],
    bases=(_ModelBase,), namespace={"__module__": __name__, "__doc__": _ModelBase.__doc__})


@dataclass
class KeepConfig:
    """patch sampling: the kept-patch rate over the run"""

    keep_schedule: str = setting("linear", "kept-patch rate over training", choices=("fixed", "linear", "cyclic", "cosine"))
    keep_min: float = setting(0.5, "lowest kept-patch rate")
    keep_full_from: float = setting(0.8, "progress from which all patches are used")
    keep_cycles: int = setting(4, "cycles of the cyclic keep schedule")
    keep_step: float = setting(0.125, "keep rates are quantized to this step (one compiled shape per level)")
    keep_splits: int = setting(2, "stages per curriculum resolution for a changing keep rate")


@dataclass
class OptimConfig:
    """the optimizer, its learning rate over the run, and the EMA of the weights"""

    lr_scaling: str = setting("sqrt", "how the LR follows the batch", choices=("linear", "sqrt", "none"))
    opt: str = setting("adamw", "optimizer (timm create_optimizer_v2 name)")
    lr: float = setting(1e-3, "peak learning rate at --batch-size")
    warmup: float = setting(0.05, "LR warm-up, as a share of training")
    lr_decay: str = setting("linear", "LR decay to 0 at the end of the budget (constant: none, a WSD trunk)",
                            choices=("linear", "cosine", "constant"))
    weight_decay: float = setting(0.05, "AdamW weight decay (weights only)")
    clip_grad: float = setting(1.0, "gradient norm clip (0: off)")
    ema: bool = setting(True, "keep an EMA of the weights (evaluated beside them)")
    ema_halflife: float = setting(0.02, "EMA half-life as a share of the first plan's images (fixed for the run)")


def _pairs(obj, *names: str) -> None:
    """'start,end' settings as float pairs: a scalar is (v, v); lists (JSON, YAML) become tuples."""
    for name in names:
        v = getattr(obj, name)
        v = (v, v) if isinstance(v, (int, float)) else v
        setattr(obj, name, tuple(float(x) for x in v))


@dataclass
class AugmentConfig:
    """augmentation and regularization over the run"""

    label_smoothing: float = setting(0.1, "label smoothing")
    mixup: float = setting(0.8, "mixup alpha")
    cutmix: float = setting(1.0, "cutmix alpha")
    mix_prob: tuple = setting((0.0, 0.8), "mixup/cutmix probability, 'start,end' (linear in progress)")
    randaug: tuple = setting((0.0, 0.0), "RandAugment magnitude 0-30, 'start,end' (0 = off)")
    randaug_ops: int = setting(2, "RandAugment ops per image")
    drop_path: tuple = setting((0.0, 0.1), "drop path rate, 'start,end'")

    def __post_init__(self):
        _pairs(self, "mix_prob", "randaug", "drop_path")


@dataclass
class GrowthConfig:
    """progressive depth growth (fastvit.train.growth): the depth per curriculum stage"""

    mode: str = setting("none", "none, manual (MoGrow at the curriculum's stage ends) or auto (AutoProg's search "
                                "at each)", choices=("none", "manual", "auto"), flag="--growth")
    growth_depth: tuple = setting((0.5, 1.0), "depth as a share of the model's, 'first,last' stage (linear over "
                                              "the curriculum's stages)")
    growth_opt: str = setting("keep", "optimizer at a growth: the moments kept and duplicated with their "
                                      "blocks, or a fresh AdamW (the authors'; 0.2-0.4 points lower on "
                                      "Imagenette, DEFAULTS.md)", choices=("keep", "fresh"))
    growth_window: float = setting(0.035, "auto: share of the training seconds (--epochs: steps) spent in the "
                                          "supernet windows, all boundaries together (real training; at least "
                                          "two steps per candidate)")
    growth_score_images: int = setting(512, "auto: fixed training images each candidate is scored on")

    def __post_init__(self):
        _pairs(self, "growth_depth")


@dataclass
class ScheduleConfig:
    """the batch and token schedule: batch per stage, token size over the run"""

    # the settings this section held before the split (keep / optim / augment / growth): in a config of
    # then (config.json, a checkpoint, a YAML file) TrainConfig.nest moves them to their sections
    moved_to: typing.ClassVar[tuple] = (KeepConfig, OptimConfig, AugmentConfig, GrowthConfig)

    tokens: str | None = setting(None, "token-size schedule patch:share,... e.g. 32:0.3,16:0.7: coarse tokens "
                                       "early, one master patch weight resized by --token-resize (default: the model's patch "
                                       "throughout)")
    batch_size: int = setting(256, "batch at the final res with all patches (even: mixup pairs)")
    const_tokens: bool = setting(True, "bigger batches at low res / low keep (tokens per batch constant)")
    max_batch: int = setting(1024, "largest batch of any stage")


@dataclass
class BudgetConfig:
    """the budget: give exactly one of --hours, --minutes, --epochs"""

    hours: float | None = setting(None, "budget in hours of counted wall-clock time")
    minutes: float | None = setting(None, "budget in minutes of counted wall-clock time")
    epochs: float | None = setting(None, "budget in images: N x train images (comparisons by epochs)")
    replan_tol: float = setting(0.10, "re-plan when the measured speed drifts by more than this share")
    probe_iters: int = setting(3, "timed steps per shape when probing speeds")
    scaling: str | None = setting(None, "--model auto: the scaling law that turns the budget into a model "
                                        "(fastvit-sweep --fit-scaling's scaling.json; default: the shipped prior "
                                        "of the device)")
    auto_probe_share: float = setting(0.03, "--model auto: share of the budget the candidates' speed probes may "
                                            "take (counted; cached per machine and shape)")
    auto_grow: bool = setting(False, "--model auto: weigh each shape grown by --growth manual beside the fixed "
                                     "ones, picked where the law's growth term forecasts it pays (off: issue 22's "
                                     "evidence, bench/results/auto; --growth manual weighs grown shapes only)")

    @property
    def given(self) -> bool:
        return any(b is not None for b in (self.hours, self.minutes, self.epochs))

    @property
    def seconds(self) -> float | None:
        """The wall-clock budget; None for an --epochs (image) budget or none."""
        if self.hours is not None:
            return self.hours * 3600.0
        if self.minutes is not None:
            return self.minutes * 60.0
        return None


@dataclass
class RunConfig:
    """where the run goes and how it is run"""

    out: str = setting("runs/fastvit", "run dir: plan, checkpoints, metrics, results.json, curves.png")
    recipe: str = setting("fastvit", "fastvit, or baseline (timm ViT, fixed res, all patches, torchvision)",
                          choices=("fastvit", "baseline"))
    device: str | None = setting(None, "cpu, cuda or cuda:N (default: cuda when available)")
    seed: int = setting(0, "random seed")
    init_from: str | None = setting(None, "start from this checkpoint's (file or run dir: its newest) weights, "
                                          "optimizer and EMA, with a fresh plan and schedules (a WSD branch)")
    compile: bool | None = setting(None, "torch.compile (default: on for cuda)")
    amp: bool | None = setting(None, "bf16 autocast (default: on for cuda)")
    ckpt_minutes: float = setting(10.0, "checkpoint at least every N minutes; more often in a short run: every "
                                        "5% of the budget (--epochs: of the steps), at least 30 s apart")
    ckpt_every_steps: int = setting(0, "also checkpoint every N steps (0: off)")
    evals: int = setting(3, "periodic validations during training (not counted)")
    eval_images: int = setting(10000, "images per periodic validation (the final one is full)")
    log_every: int = setting(10, "log every N steps")
    profile_steps: int = setting(0, "GPU-busy: a torch.profiler window over N steps of every stage, logged as "
                                    "kind=profile rows in metrics.jsonl (0: off)")
    progress: bool = setting(True, "progress bar")
    tensorboard: bool = setting(True, "TensorBoard event files in RUN_DIR/tb (tensorboard --logdir runs/)")


@dataclass
class TrainConfig:
    data: DataConfig = setting(default_factory=DataConfig)
    model: ModelConfig = setting(default_factory=ModelConfig)
    keep: KeepConfig = setting(default_factory=KeepConfig)
    schedule: ScheduleConfig = setting(default_factory=ScheduleConfig)
    optim: OptimConfig = setting(default_factory=OptimConfig)
    augment: AugmentConfig = setting(default_factory=AugmentConfig)
    growth: GrowthConfig = setting(default_factory=GrowthConfig)
    budget: BudgetConfig = setting(default_factory=BudgetConfig)
    run: RunConfig = setting(default_factory=RunConfig)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        check_choices(self)
        self.data.loader.check(flags=True)
        k, s, o, g, b, r = self.keep, self.schedule, self.optim, self.growth, self.budget, self.run
        budgets = [x for x in (b.hours, b.minutes, b.epochs) if x is not None]
        checks = [
            (len(budgets) <= 1, "give one budget: --hours, --minutes or --epochs"),
            (all(x > 0 for x in budgets), "the budget must be positive"),
            (0 < k.keep_min <= 1, "--keep-min must be in (0, 1]"),
            (0 <= k.keep_full_from <= 1, "--keep-full-from must be in [0, 1]"),
            (s.batch_size >= 2 and s.batch_size % 2 == 0, "--batch-size must be even and >= 2 (mixup pairs)"),
            (o.lr > 0 and 0 <= o.warmup < 1, "--lr must be > 0 and --warmup in [0, 1)"),
            (r.device in (None, "cpu", "cuda") or str(r.device).startswith("cuda:"),
             f"--device must be cpu or cuda, got {r.device!r}"),
            (r.ckpt_minutes > 0, "--ckpt-minutes must be > 0"),
            (s.tokens is None or r.recipe != "baseline", "--tokens needs --recipe fastvit (the baseline has one patch size)"),
            (0 < g.growth_depth[0] <= g.growth_depth[-1] <= 1, "--growth-depth must be 'first,last' with "
                                                               "0 < first <= last <= 1"),
            (0 <= g.growth_window < 0.5 and g.growth_score_images >= 1,
             "--growth-window must be in [0, 0.5) and --growth-score-images >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @property
    def has_budget(self) -> bool:
        return self.budget.given

    @property
    def budget_s(self) -> float | None:
        return self.budget.seconds

    def to_dict(self) -> dict:
        """Nested, JSON-ready; TrainConfig.from_dict(cfg.to_dict()) == cfg."""
        return to_dict(self)

    @classmethod
    def leaf_keys(cls) -> dict[str, tuple]:
        """flat key -> (section, ..., field) of every setting, e.g. lr -> (optim, lr), data -> (data, root)."""
        return leaf_paths(cls)

    @classmethod
    def nest(cls, d: Mapping) -> dict:
        """Flat keys (old config.json files, presets, CLI overrides) moved into their sections; nested
        sections kept, less the keys a section held before a split (its `moved_to`: `schedule: {lr: ...}`
        of a config written before optim was split out), which move to their sections; anything else left
        where it is for from_dict to refuse."""
        paths, out = cls.leaf_keys(), {}
        for k, v in d.items():
            if k in cls.__dataclass_fields__ and isinstance(v, Mapping):
                _merge_into(out, cls._section_keys(k, v, paths))
            elif k in paths:
                _merge_into(out, _wrap(paths[k], v))
            else:
                out[k] = v
        return out

    @classmethod
    def _section_keys(cls, name: str, v: Mapping, paths: dict) -> dict:
        """Section `name`'s mapping nested from the top: its own keys under it, a key of a section it
        was split into (`moved_to`) at that setting's path."""
        sec = typing.get_type_hints(cls)[name]
        moved = {f for f, t in typing.get_type_hints(cls).items() if t in getattr(sec, "moved_to", ())}
        out: dict = {name: {}}
        for k, x in v.items():
            if k not in sec.__dataclass_fields__ and paths.get(k, ("",))[0] in moved:
                _merge_into(out, _wrap(paths[k], x))
            else:
                out[name][k] = x
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrainConfig":
        """Nested sections and/or flat leaf keys; unknown keys raise ConfigError."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a config must be a mapping of settings, got {type(d).__name__}")
        return from_dict(cls, cls.nest(d))


def _wrap(path: tuple, v):
    for k in reversed(path):
        v = {k: v}
    return v


def _merge_into(dst: dict, src: Mapping) -> dict:
    """Deep merge: mappings merge key by key, anything else replaces."""
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), Mapping):
            _merge_into(dst[k], v)
        else:
            dst[k] = _merge_into({}, v) if isinstance(v, Mapping) else v    # a copy: callers' dicts untouched
    return dst


def make_config(preset: str | None, overrides: dict, yaml_path: str | None = None) -> TrainConfig:
    """preset → YAML file (nested or flat) → explicit overrides (None values are 'not given')."""
    return preset_under(preset, given_settings(overrides, yaml_path))


def preset_under(preset: str | None, given: Mapping) -> TrainConfig:
    """The config of `preset` (default gpu) under what the user set (given_settings' nested dict)."""
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    return TrainConfig.from_dict(_over(TrainConfig.nest(PRESETS.get(preset or "gpu", {})), given))


BUDGET_UNITS = ("hours", "minutes", "epochs")


def _over(below: dict, layer: Mapping) -> dict:
    """One layer of settings over the layers below it (flag > file > preset), into `below`: every setting
    the layer gives replaces the one below (mappings merge key by key); a budget, in any unit, replaces
    the budget below in every unit (a --minutes flag over a file's `budget: hours:`)."""
    budget = layer.get("budget")
    if isinstance(budget, Mapping) and any(budget.get(u) is not None for u in BUDGET_UNITS) \
            and isinstance(below.get("budget"), dict):
        for u in BUDGET_UNITS:
            below["budget"].pop(u, None)
    return _merge_into(below, layer)


def read_settings_yaml(path: str, name: str) -> dict:
    """A YAML file of settings (a mapping), or a one-line ConfigError naming it as `name`."""
    import yaml

    try:
        with open(path) as f:
            y = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read {name}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name} is not valid YAML: {str(e).splitlines()[0]}") from None
    except ValueError as e:                         # not text (UnicodeDecodeError)
        raise ConfigError(f"{name} is not a text file: {e}") from None
    if not isinstance(y, dict):
        raise ConfigError(f"{name} must hold a mapping of settings")
    return y


def given_settings(overrides: dict, yaml_path: str | None = None) -> dict:
    """What the user set, nested: the explicit overrides (None values are 'not given') over the YAML file
    (nested or flat), with `_over`'s rule. Presets not included."""
    d: dict = {}
    if yaml_path:
        _over(d, TrainConfig.nest(read_settings_yaml(yaml_path, f"--config {yaml_path}")))
    return _over(d, TrainConfig.nest({k: v for k, v in overrides.items() if v is not None}))


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"   # fastvit/recipes (repo root: recipes/)


def read_recipe(path: str | Path) -> dict:
    """One recipe file (fastvit/recipes/NAME.yaml: every setting, nested by section), nested."""
    return TrainConfig.nest(read_settings_yaml(str(path), f"recipe {Path(path).name}"))


def _load_presets() -> dict[str, dict]:
    return {p.stem: read_recipe(p) for p in sorted(RECIPES_DIR.glob("*.yaml"))}


# Named configs, one recipe file each (fastvit/recipes/*.yaml, written out in full; README there):
# "gpu" is the ImageNet default; "cpu" is sized for a 2-core laptop-class CPU (the demo); "test" is the
# smallest model that still learns (unit tests); the others are the evidence's variants.
PRESETS: dict[str, dict] = _load_presets()
