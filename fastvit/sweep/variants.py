"""Named variants of a sweep: config overrides of fastvit-train, resolved against the base config.

A variant item is NAME, key=value, NAME=FILE.yaml (the settings of a file, e.g. fastvit-search's
best.yaml, less the run's own: budget, seed, data, out), or several joined by '+' (e.g. `no-pss+lr=3e-3`);
its label is the item as written, a file by its NAME. A part `shape=d4-w192` (fastvit.models.shapes) sets depth,
embed_dim, num_heads and mlp_ratio. The seed paper's ablations switch one trick off at a time from the full recipe.
"""
from __future__ import annotations

from collections.abc import Callable

from fastvit.models.shapes import parse_shape
from fastvit.train.config import ConfigError, TrainConfig, make_config, read_settings_yaml


def _final_res(base: TrainConfig, data_res: list[int]) -> int:
    return base.data.final_res or max(data_res)


def _plain(base: TrainConfig, data_res) -> dict:
    name = base.model.name
    return {"model": name.rsplit("_", 1)[0] + "_plain"}


def _local(base: TrainConfig) -> str:
    return base.model.name.rsplit("_", 1)[0] + "_local"


def _plain_shards(base: TrainConfig, data_res) -> dict:
    return {**_plain(base, data_res), "curriculum": f"{_final_res(base, data_res)}:1", "keep_min": 1.0}


# name -> (description, overrides(base config, the data's resolutions))
VARIANTS: dict[str, tuple[str, Callable[[TrainConfig, list], dict]]] = {
    "fastvit": ("the full recipe (locality, curriculum, patch sampling as the preset sets them)", lambda b, r: {}),
    "baseline": ("plain ViT: timm VisionTransformer, torchvision loader over the source JPEGs, fixed res",
                 lambda b, r: {"recipe": "baseline"}),
    "plain-shards": ("plain ViT on our shards: no locality, one resolution, all patches",
                     lambda b, r: _plain_shards(b, r)),
    "no-locality": ("the recipe with the plain (non-local) ViT", _plain),
    "no-curriculum": ("the recipe at one resolution (the final one)",
                      lambda b, r: {"curriculum": f"{_final_res(b, r)}:1"}),
    "no-pss": ("the recipe with all patches (keep_min=1)", lambda b, r: {"keep_min": 1.0}),
    "pss": ("the recipe with patch sampling on (keep_min=0.5, linear to all patches)", lambda b, r: {"keep_min": 0.5}),
    # the seed paper's additive rows: plain ViT on our shards with one trick back
    "add-locality": ("plain-shards with the locality ViT", lambda b, r: {**_plain_shards(b, r), "model": b.model.name}),
    "add-curriculum": ("plain-shards with the preset's curriculum",
                       lambda b, r: {**_plain_shards(b, r), "curriculum": b.data.curriculum}),
    "add-pss": ("plain-shards with patch sampling (keep_min=0.5)", lambda b, r: {**_plain_shards(b, r), "keep_min": 0.5}),
    "all": ("locality + curriculum + patch sampling (keep_min=0.5): the seed paper's last row",
            lambda b, r: {"model": _local(b), "curriculum": b.data.curriculum, "keep_min": 0.5}),
    # the later papers' methods on top of the recipe
    "growth": ("the recipe with MoGrow's manual depth growth at the curriculum's stage ends", lambda b, r: {"growth": "manual"}),
}


def parse_value(text: str):
    """'3e-3' → 0.003, '4' → 4, 'true' → True, 'none' → None, '0,0.8' → [0.0, 0.8], else the string."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    if "," in t and ":" not in t:
        try:
            return [float(v) for v in t.split(",")]
        except ValueError:
            pass
    return t


def parse_overrides(items) -> dict:
    """['lr=3e-3', ...] → {'lr': 0.003}; a missing '=' is a ConfigError."""
    out = {}
    for it in items:
        key, eq, val = it.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"override {it!r} is not key=value")
        out[key.strip().replace("-", "_")] = parse_value(val)
    return out


# settings a sweep sets per run: a variant's YAML file (e.g. fastvit-search's best.yaml) does not
RUN_KEYS = ("data", "out", "minutes", "hours", "epochs", "seed", "device", "resume", "overwrite", "init_from")


def yaml_variant(part: str) -> str | None:
    """'NAME=FILE.yaml' (NAME not a setting) → FILE: a variant whose settings are that YAML file's."""
    key, eq, val = part.partition("=")
    if eq and val.strip().lower().endswith((".yaml", ".yml")) and key.strip().replace("-", "_") not in \
            TrainConfig.leaf_keys():
        return val.strip()
    return None


def label(item: str) -> str:
    """How a variant item is named in the sweep's dirs and tables: as written, a YAML part by its NAME
    (letters, digits, '.', '_', '-'; a ConfigError otherwise)."""
    import re

    parts = []
    for p in item.split("+"):
        p = p.strip()
        if yaml_variant(p):
            name = p.partition("=")[0].strip()
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
                raise ConfigError(f"variant {p!r}: NAME=FILE.yaml needs a NAME of letters, digits, '.', '_' or '-'")
            p = name
        parts.append(p)
    return "+".join(parts)


def _yaml_overrides(file: str) -> dict:
    """The file's settings as flat keys, less the run's own. Its layout (flat keys, fastvit-train's
    sections, or the sections of an older config) is read by TrainConfig.nest, the one reader of layouts."""
    leaves = TrainConfig.leaf_keys()
    by_path: dict = {}
    for key, path in sorted(leaves.items()):       # aliases (model/name, data/root): the section's name wins
        if path not in by_path or key == path[0]:
            by_path[path] = key
    run_paths = {leaves[k] for k in RUN_KEYS if k in leaves}
    flat: dict = {}

    def walk(d: dict, path: tuple) -> None:        # the nested sections, down to their settings
        for k, v in d.items():
            p = (*path, k)
            if isinstance(v, dict) and p not in by_path:
                walk(v, p)                         # a section (data:, model:, ...)
            elif p in run_paths:
                continue                           # the run's own (budget, seed, data, out, ...)
            elif p in by_path:
                flat[by_path[p]] = tuple(v) if isinstance(v, list) else v
            elif len(p) == 1:
                flat[k] = v                        # an unknown key: make_config names it
            else:
                raise ConfigError(f"variant file {file}: unknown setting {'.'.join(map(str, p))}")

    def underscored(d: dict) -> dict:              # embed-dim: as the flag is spelt
        return {str(k).replace("-", "_"): underscored(v) if isinstance(v, dict) else v for k, v in d.items()}

    walk(TrainConfig.nest(underscored(read_settings_yaml(file, f"variant file {file}"))), ())
    return flat


def resolve(item: str, base: TrainConfig, data_res: list[int]) -> dict:
    """The overrides of one variant item (checked: unknown names and keys are ConfigErrors)."""
    out: dict = {}
    for part in item.split("+"):
        part = part.strip()
        if file := yaml_variant(part):
            out.update(_yaml_overrides(file))
        elif part.startswith("shape="):
            try:
                out.update(parse_shape(part[len("shape="):]))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        elif "=" in part:
            out.update(parse_overrides([part]))
        elif part in VARIANTS:
            out.update(VARIANTS[part][1](base, data_res))
        else:
            raise ConfigError(f"unknown variant {part!r}; known: {', '.join(VARIANTS)} (or key=value)")
    return out


def check(item: str, preset: str, common: dict, data_res: list[int]) -> dict:
    """Resolve and validate a variant against the preset + common overrides; returns its overrides."""
    base = make_config(preset, common)
    ov = resolve(item, base, data_res)
    make_config(preset, {**common, **ov})        # unknown keys / bad values: ConfigError
    return ov


def listing() -> str:
    return "\n".join(f"{k:14s} {d}" for k, (d, _) in VARIANTS.items())
