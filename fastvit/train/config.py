"""One dataclass carries a run's settings from the CLI / a YAML file to every part of training.

Unknown keys raise one clear error (no silent typos); presets are named partial configs applied
before the user's own settings. The resolved config is saved in the run dir and in every checkpoint.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class ConfigError(ValueError):
    """A setting the user gave is wrong; the message says which and why (printed as one line)."""


@dataclass
class TrainConfig:
    # what and where
    data: str = ""                       # fastvit-prep OUT dir (manifest.json)
    out: str = "runs/fastvit"            # run dir: plan, checkpoints, metrics, results
    recipe: str = "fastvit"              # fastvit | baseline (timm ViT, fixed res, all patches, torchvision)
    model: str = "vit_small_local"
    depth: int | None = None             # model overrides (small runs on CPU)
    embed_dim: int | None = None
    num_heads: int | None = None
    patch_size: int = 16
    device: str | None = None            # None: cuda when available, else cpu
    backend: str | None = None           # None: chosen per device (see loop.choose_backend)
    workers: int | None = None
    seed: int = 0
    # budget: exactly one of these
    hours: float | None = None
    minutes: float | None = None
    epochs: float | None = None          # an image budget: epochs × train images
    # curriculum (resolution) and patch sampling
    final_res: int | None = None         # None: the data's largest resolution (GPU), 64-ish on CPU
    curriculum: str | None = None        # "64:0.4,128:0.35,224:0.25" (res:share); None: default ladder
    curriculum_stages: int = 3
    keep_schedule: str = "linear"        # fixed | linear | cyclic | cosine
    keep_min: float = 0.5
    keep_full_from: float = 0.8          # all patches from this progress on
    keep_cycles: int = 4
    keep_step: float = 0.125             # keep rates are quantized (one compiled shape per level)
    keep_splits: int = 2                 # segments per resolution stage for a changing keep rate
    # batch and optimizer
    batch_size: int = 256                # at the final resolution with all patches
    const_tokens: bool = True            # bigger batches at low res / low keep (tokens per batch constant)
    max_batch: int = 1024
    lr_scaling: str = "sqrt"             # how LR follows the batch: linear | sqrt | none
    opt: str = "adamw"
    lr: float = 1e-3                     # at batch_size
    warmup: float = 0.05                 # share of training progress
    lr_decay: str = "linear"             # linear | cosine, to 0 at the end of the budget
    weight_decay: float = 0.05
    clip_grad: float = 1.0
    label_smoothing: float = 0.1
    # augmentation strength (start → end of training, linear in progress)
    mixup: float = 0.8                   # mixup alpha
    cutmix: float = 1.0                  # cutmix alpha
    mix_prob: tuple = (0.0, 0.8)
    randaug: tuple = (0.0, 0.0)          # RandAugment magnitude (torchvision scale 0-30; 0 = off)
    randaug_ops: int = 2
    drop_path: tuple = (0.0, 0.1)
    # EMA of the weights
    ema: bool = True
    ema_halflife: float = 0.02           # half-life as a share of the planned steps
    # run control
    compile: bool | None = None          # None: on for cuda, off for cpu
    amp: bool | None = None              # bf16 autocast; None: on for cuda
    ckpt_minutes: float = 10.0
    ckpt_every_steps: int = 0            # also every N steps (0: off); tests use it
    evals: int = 3                       # periodic validations during training (not counted)
    eval_images: int = 10000             # cap on the periodic validations (the final one is full)
    log_every: int = 10
    replan_tol: float = 0.10
    probe_iters: int = 3
    progress: bool = True
    baseline_res: int | None = None      # --recipe baseline: fixed res (None: final_res)

    def __post_init__(self):
        for name in ("mix_prob", "randaug", "drop_path"):
            v = getattr(self, name)
            if isinstance(v, (int, float)):
                v = (float(v), float(v))
            setattr(self, name, tuple(float(x) for x in v))
        self.validate()

    def validate(self) -> None:
        budgets = [b for b in (self.hours, self.minutes, self.epochs) if b is not None]
        checks = [
            (self.recipe in ("fastvit", "baseline"), f"--recipe must be fastvit or baseline, got {self.recipe!r}"),
            (len(budgets) <= 1, "give one budget: --hours, --minutes or --epochs"),
            (all(b > 0 for b in budgets), "the budget must be positive"),
            (self.keep_schedule in ("fixed", "linear", "cyclic", "cosine"),
             f"--keep-schedule must be fixed, linear, cyclic or cosine, got {self.keep_schedule!r}"),
            (0 < self.keep_min <= 1, "--keep-min must be in (0, 1]"),
            (0 <= self.keep_full_from <= 1, "--keep-full-from must be in [0, 1]"),
            (self.lr_decay in ("linear", "cosine"), f"--lr-decay must be linear or cosine, got {self.lr_decay!r}"),
            (self.lr_scaling in ("linear", "sqrt", "none"), "--lr-scaling must be linear, sqrt or none"),
            (self.batch_size >= 2 and self.batch_size % 2 == 0, "--batch-size must be even and >= 2 (mixup pairs)"),
            (self.lr > 0 and 0 <= self.warmup < 1, "--lr must be > 0 and --warmup in [0, 1)"),
            (self.device in (None, "cpu", "cuda") or str(self.device).startswith("cuda:"),
             f"--device must be cpu or cuda, got {self.device!r}"),
            (self.backend in (None, "ffcv", "dali", "torchvision", "gpu_resident"),
             f"--backend must be ffcv, dali, torchvision or gpu_resident, got {self.backend!r}"),
            (self.ckpt_minutes > 0, "--ckpt-minutes must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @property
    def has_budget(self) -> bool:
        return any(b is not None for b in (self.hours, self.minutes, self.epochs))

    @property
    def budget_s(self) -> float | None:
        if self.hours is not None:
            return self.hours * 3600.0
        if self.minutes is not None:
            return self.minutes * 60.0
        return None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def known_keys(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = sorted(set(d) - cls.known_keys())
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}")
        return cls(**d)


# Named partial configs. "gpu" is the ImageNet default; "cpu" is sized for a 2-core laptop-class CPU
# (the demo); "test" is the smallest model that still learns (unit tests).
PRESETS: dict[str, dict] = {
    "gpu": {},
    # cpu: measured best of six 3-minute runs on the demo data (fastvit/train/DEFAULTS.md): patch 16,
    # all patches, 64 px for the first half then 96 px (the final and evaluation size); patch 8 and
    # patch sampling cost more steps than they give back in a few CPU minutes
    "cpu": dict(model="vit_tiny_local", depth=4, final_res=96, curriculum="64:0.5,96:0.5", keep_min=1.0, batch_size=64,
                const_tokens=False, max_batch=256, lr=2e-3, lr_scaling="sqrt", evals=2, eval_images=1000,
                ckpt_minutes=5.0, mix_prob=(0.0, 0.0), drop_path=(0.0, 0.0), warmup=0.05,
                ema_halflife=0.05, probe_iters=1),
    "test": dict(model="vit_tiny_local", depth=1, embed_dim=32, num_heads=2, final_res=32,
                 curriculum_stages=1, batch_size=16, max_batch=64, lr=3e-3, evals=0, eval_images=64,
                 mix_prob=(0.0, 0.0), drop_path=(0.0, 0.0), compile=False, probe_iters=2,
                 log_every=1, ema_halflife=0.1, progress=False),
}


def make_config(preset: str | None, overrides: dict, yaml_path: str | None = None) -> TrainConfig:
    """preset → YAML file → explicit overrides (None values are 'not given')."""
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    d: dict = dict(PRESETS.get(preset or "gpu", {}))
    if yaml_path:
        import yaml

        try:
            with open(yaml_path) as f:
                y = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read --config {yaml_path}: {e.strerror}") from None
        if not isinstance(y, dict):
            raise ConfigError(f"--config {yaml_path} must hold a mapping of settings")
        d.update(y)
    d.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(d)

