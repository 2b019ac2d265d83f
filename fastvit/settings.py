"""Settings dataclasses: one strict loader, one choice check and one argparse generator for all of them.

A settings class is a dataclass whose fields may carry metadata (see `setting`): "help" (the field's
doc, shown by --help), "choices" (allowed values, checked by argparse and by `check_choices`), "flag"
(the option name when it is not --leaf-name) and "cli": False (no flag, not serialized: a callable).
A field whose type is itself a dataclass is a nested section; a section split in parts names them in a
class attribute `moved_to` (their keys are then hinted from it too).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping


class ConfigError(ValueError):
    """A setting is wrong; the message says which and why (printed as one line)."""


def setting(default=dataclasses.MISSING, help: str = "", *, choices=None, flag: str | None = None,
            default_factory=dataclasses.MISSING, cli: bool = True):
    """A dataclass field with its doc (and choices, flag name) kept where the generator finds them."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if flag is not None:
        meta["flag"] = flag
    if not cli:
        meta["cli"] = False
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _bare(t):
    """int | None -> int; tuple[float, float] -> tuple; Callable[...] | None -> Callable."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        t = args[0] if len(args) == 1 else t
    return typing.get_origin(t) or t


def _section(cls, f: dataclasses.Field):
    t = _bare(_hints(cls)[f.name])
    return t if isinstance(t, type) and dataclasses.is_dataclass(t) else None


def _fields(cls):
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli", True)]


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def key_name(f: dataclasses.Field) -> str:
    """The flat key (and argparse dest) of a leaf: its flag's name (--data -> data), else its own."""
    return flag_name(f)[2:].replace("-", "_")


def leaves(cls, path: tuple = ()) -> list[tuple[tuple, dataclasses.Field, type]]:
    """(path of field names, field, bare type) of every leaf under `cls`, nested sections walked."""
    out = []
    for f in _fields(cls):
        sub = _section(cls, f)
        out += leaves(sub, path + (f.name,)) if sub else [(path + (f.name,), f, _bare(_hints(cls)[f.name]))]
    return out


def leaf_paths(cls) -> dict[str, tuple]:
    """flat key -> path of every leaf: its own name and its flag's name (--data for data.root)."""
    out: dict[str, tuple] = {}
    for path, f, _ in leaves(cls):
        for k in {f.name, key_name(f)}:
            if out.setdefault(k, path) != path:
                raise TypeError(f"{cls.__name__}: leaf name {k!r} is used by {'.'.join(out[k])} and {'.'.join(path)}")
    return out


def _all_names(cls) -> set[str]:
    return {f.name for f in _fields(cls)} | set(leaf_paths(cls))


def _hint_names(cls) -> set[str]:
    """What a misspelt key of `cls` is matched against: its names and those of the sections it was split
    into (a class attribute `moved_to`: their keys are read from it too, fastvit.train.config.TrainConfig.nest)."""
    return _all_names(cls).union(*(_all_names(c) for c in getattr(cls, "moved_to", ())))


def from_dict(cls, d, *, what: str = "config key", _prefix: str = ""):
    """`cls` built from a (nested) mapping; an unknown key raises ConfigError naming it and its closest
    known name. The one unknown-key check of the project: training, model, loader and prep settings use it."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{_prefix.rstrip('.') or cls.__name__} must be a mapping of settings, got {type(d).__name__}")
    fs = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in d if k not in fs]
    if unknown:
        names = sorted(_hint_names(cls))

        def hint(k):
            near = difflib.get_close_matches(str(k), names, n=1)
            return f"{_prefix}{k}" + (f" (did you mean {near[0]}?)" if near else "")
        raise ConfigError(f"unknown {what}(s) {', '.join(hint(k) for k in unknown)}")
    kw = {}
    for k, v in d.items():
        sub = _section(cls, fs[k])
        kw[k] = from_dict(sub, v, what=what, _prefix=f"{_prefix}{k}.") if sub and not isinstance(v, sub) else v
    return cls(**kw)


def to_dict(obj) -> dict:
    """Nested dict of the serializable fields (no cli=False ones); inverse of from_dict."""
    return {f.name: (to_dict(v) if dataclasses.is_dataclass(v) else v)
            for f in _fields(type(obj)) for v in [getattr(obj, f.name)]}


def _or(values) -> str:
    v = [str(x) for x in values]
    return v[0] if len(v) == 1 else f"{', '.join(v[:-1])} or {v[-1]}"


def check_choices(obj, *, flags: bool = True) -> None:
    """ConfigError for the first field (nested sections walked) whose value is not one of its choices;
    None passes (= not set). Names the flag (--keep-schedule) or, with flags=False, the key."""
    for f in _fields(type(obj)):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            check_choices(v, flags=flags)
        elif "choices" in f.metadata and v is not None and v not in f.metadata["choices"]:
            raise ConfigError(f"{flag_name(f) if flags else f.name} must be {_or(f.metadata['choices'])}, got {v!r}")


def pair(text: str) -> tuple[float, float]:
    """'a,b' -> (a, b); 'a' -> (a, a): a value that ramps from start to end of training."""
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a number or 'start,end', got {text!r}") from None
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError("give one value or 'start,end'")
    return (parts[0], parts[-1])


def _show(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return ",".join(f"{x:g}" for x in v) if isinstance(v, tuple) else str(v)


def add_dataclass_flags(parser, cls, *, exclusive=(), groups: bool = True) -> dict[str, str]:
    """One option per leaf of `cls`: --leaf-name (or the field's "flag"), dest = its flat key, default
    None (= not given). Types from the annotations; bool: --x/--no-x; tuple: 'start,end' or one value.
    Help is the field's doc, with its default when that is not None. Top-level sections become
    argument groups (groups=True); `exclusive`: tuples of leaf names that may not be given together.
    Returns {dest: flag}."""
    exclusive = [set(names) for names in exclusive]
    excl_groups: dict[int, object] = {}
    sec_groups: dict[str, object] = {}
    out = {}
    for path, f, t in leaves(cls):
        target = parser
        if groups and len(path) > 1:
            if path[0] not in sec_groups:
                sub = _hints(cls)[path[0]]
                doc = (_bare(sub).__doc__ or "").strip().splitlines()
                sec_groups[path[0]] = parser.add_argument_group(path[0], doc[0] if doc else None)
            target = sec_groups[path[0]]
        for i, names in enumerate(exclusive):
            if f.name in names:
                if i not in excl_groups:
                    excl_groups[i] = target.add_mutually_exclusive_group()
                target = excl_groups[i]
        default = f.default if f.default is not dataclasses.MISSING else None
        doc = f.metadata.get("help", "")
        if default not in (None, ""):
            doc = f"{doc} (default: {_show(default)})" if doc else f"default: {_show(default)}"
        kw = dict(dest=key_name(f), default=None, help=doc.replace("%", "%%"))
        if t is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif t is tuple:
            kw.update(type=pair, metavar="START[,END]")
        else:
            kw["type"] = t if t in (int, float) else str
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        target.add_argument(flag_name(f), **kw)
        out[key_name(f)] = flag_name(f)
    return out
