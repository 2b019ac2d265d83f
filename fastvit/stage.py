"""One notion of a stage: what a run of consecutive training steps trains on.

The planner makes them (`fastvit.train.planner`), the curriculum loader serves them step by step
(`fastvit.data.CurriculumLoader` yields each step's Stage: the single source of "what this step is"),
the trainer reads them, and `results.json["stages"]` lists them. Immutable: a re-plan makes new ones.

    Stage(res=64, batch_size=512, steps=1000)            # what the data side needs
    Stage(res=64, batch_size=512, steps=1000, keep=0.5, lr_scale=1.41, f0=0.0, f1=0.4, speed=9e3)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class Stage:
    res: int                       # image side the loader delivers (px)
    batch_size: int
    steps: int = 0                 # training steps in this stage (0: not planned yet)
    keep: float = 1.0              # share of patches the model sees (quantized; 1.0 = all)
    depth: int | None = None       # active blocks (progressive growth); None: the model's full depth
    patch_size: int | None = None  # tokenizer patch size (coarse-to-fine tokens); None: the model's
    lr_scale: float = 1.0          # LR multiplier for this batch size (1.0 at the reference batch)
    f0: float = 0.0                # share of the training window where the stage starts ...
    f1: float = 1.0                # ... and ends (schedules read progress in this window)
    speed: float = 0.0             # planned images/s (time budgets); re-plans rescale it to the measured speed
    probe_speed: float = 0.0       # images/s the probe measured (synthetic on-device data); never rescaled,
                                   # 0 when not probed (--epochs, a batch changed after an OOM)

    def __post_init__(self):
        if self.res <= 0 or self.batch_size <= 0 or self.steps < 0:
            raise ValueError(f"bad stage {self}: res and batch_size must be positive, steps >= 0")
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"bad stage {self}: keep must be in (0, 1]")

    @property
    def kind(self) -> tuple:
        """What the model does to one image: (res, keep, depth, patch size). Out-of-memory halvings
        and the drop-path rate go by it (a batch change does not change what a stage is)."""
        return (self.res, self.keep, self.depth, self.patch_size)

    @property
    def shape(self) -> tuple:
        """What a compiled graph and a probed speed are specific to: the kind and the batch size."""
        return (self.res, self.keep, self.batch_size, self.depth, self.patch_size)

    @property
    def loader_key(self) -> tuple[int, int]:
        """Stages with the same key and next to each other are one stretch of the loader's batch order:
        the keep rate, depth and patch size are applied by the model, not the loader."""
        return (self.res, self.batch_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Stage":
        d = dict(d)
        if "batch" in d and "batch_size" not in d:     # plan.json of the first release
            d["batch_size"] = d.pop("batch")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def shallow_images(stages, depth: int) -> dict:
    """{k: images} trained at each depth k below `depth` (a growing run's shallow phase), from
    (depth, steps, batch size) of each stage; a depth of None is the full one. {} when none is shallower."""
    out: dict = {}
    for k, steps, batch in stages:
        k = int(k or depth)
        if k < depth and int(steps):
            out[k] = out.get(k, 0) + int(steps) * int(batch)
    return out


def num_kept(num_patches: int, keep: float | None) -> int:
    """Patches kept of `num_patches` at keep rate `keep` (None or >= 1: all), at least one.
    Round half up: 49 patches at keep 0.5 keep 25. The model, the schedules and the FLOP count all
    call this one function."""
    if keep is None or keep >= 1.0:
        return num_patches
    if keep <= 0.0:
        raise ValueError(f"keep_rate must be in (0, 1], got {keep}")
    return max(1, min(num_patches, int(keep * num_patches + 0.5)))


def step_ranges(stages) -> list[tuple[int, int]]:
    """[(first global step, end step)) of each stage."""
    out, acc = [], 0
    for s in stages:
        out.append((acc, acc + s.steps))
        acc += s.steps
    return out
