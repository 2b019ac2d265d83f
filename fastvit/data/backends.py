"""The loader backends in one table, the cuda/cpu choice, and which stored container a backend reads.

    spec("dali")                          # Backend(name, container, devices, modules); DataError if unknown
    installed("ffcv")                     # its modules import (checked once per process)
    resolve_device(None)                  # cuda when a GPU is visible, else cpu; "cuda" without one: DataError
    container_for("gpu_resident", ds, "train")   # "ffcv" (or "dali"): the stored files it reads for that split
    check_readable(ds, "dali", "val", 224)       # before any compute: the split has what the backend reads
    choose_auto(ds, device, [("train", None), ("val", 224)])   # -> ("gpu_resident", "why"): backend "auto"

container: "ffcv" (.beton), "dali" (webdataset tars + .idx), "any" (gpu_resident decodes whichever
the split has, the .beton first), "source" (torchvision reads the source JPEG tree prep read).
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch

from .dataset import DataError, PreppedDataset

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Backend:
    name: str
    container: str                # "ffcv" | "dali" | "any" | "source"
    devices: tuple[str, ...]      # torch device types it runs on
    modules: tuple[str, ...]      # what must import for it to run
    summary: str

    def installed(self) -> bool:
        return all(_importable(m) for m in self.modules)


TABLE: dict[str, Backend] = {b.name: b for b in (
    Backend("ffcv", "ffcv", DEVICES, ("ffcv",), "FFCV Loader over the .beton (numba-compiled decode + crop)"),
    Backend("dali", "dali", DEVICES, ("nvidia.dali",), "DALI pipeline over the webdataset tars (nvJPEG on a GPU)"),
    Backend("torchvision", "source", DEVICES, ("torchvision",), "DataLoader over the source JPEG tree (the baseline)"),
    Backend("gpu_resident", "any", DEVICES, ("torchvision",), "a shard decoded once into device memory, cropped there"),
)}
BACKENDS = tuple(TABLE)
AUTO = "auto"   # the default: the best backend installed for the device that can read the data
# The preference of `auto` per device type. cuda: DALI's GPU decode (nvJPEG), else the GPU-resident
# loader (decode once, crop on the GPU: never waits for a CPU decoder once filled); cpu: DALI (builds a
# pipeline in about a second), FFCV (numba compiles each pipeline, ~40 s on a small CPU), the source
# JPEGs with torchvision last.
AUTO_ORDER = {"cuda": ("dali", "gpu_resident", "ffcv", "torchvision"), "cpu": ("dali", "ffcv", "torchvision")}
STREAMING = ("dali", "ffcv", "torchvision")   # what a resident stage that does not fit falls back to


@functools.lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # ImportError, or a broken install (e.g. a missing shared library)
        return False
    return True


def spec(backend: str) -> Backend:
    """The table row of `backend`; one-line DataError for an unknown name ("auto" is resolved first,
    by `choose_auto`)."""
    try:
        return TABLE[backend]
    except (KeyError, TypeError):
        raise DataError(f"unknown backend {backend!r}; choose from {AUTO}, {', '.join(BACKENDS)}") from None


def installed(backend: str) -> bool:
    return spec(backend).installed()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device=None) -> torch.device:
    """torch.device of `device` (None: cuda when a GPU is visible, else cpu); DataError with one line when
    cuda is asked for but absent, or for anything but cuda/cpu."""
    try:
        dev = torch.device(default_device() if device is None else device)
    except (RuntimeError, TypeError):
        raise DataError(f"device must be cuda or cpu, not {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DataError("device='cuda' but no CUDA GPU is available (use device='cpu')")
    if dev.type not in DEVICES:
        raise DataError(f"device must be cuda or cpu, not {device!r}")
    return dev


def check_runnable(backend: str, device: torch.device) -> Backend:
    """The row of `backend` if it runs on `device` and its modules import; one-line DataError otherwise."""
    b = spec(backend)
    if device.type not in b.devices:
        raise DataError(f"the {backend} backend runs on {' or '.join(b.devices)}, not {device.type}")
    if not b.installed():
        raise DataError(f"the {backend} backend needs {', '.join(b.modules)}, which is not installed "
                        f"(scripts/setup_env.sh installs the loaders)")
    return b


def container_for(backend: str, ds: PreppedDataset, split: str) -> str | None:
    """The stored container `backend` reads for `split`: "ffcv" or "dali"; None when it reads the source
    tree (torchvision). gpu_resident: the split's .beton if it has one, else its tars ("any" when it has
    neither, which PreppedDataset.require_split reports)."""
    kind = spec(backend).container
    if kind == "source":
        return None
    if kind != "any":
        return kind
    have = ds.formats(split) if split in ds.splits else ()
    return have[0] if have else "any"


def check_readable(ds: PreppedDataset, backend: str, split: str, res: int | None = None, src=None) -> int | None:
    """Before a loader is built: `split` has images and what `backend` reads (files of its container,
    or the source tree). Returns the stored resolution a loader at `res` reads (None without res, or for
    the source tree). One-line DataError otherwise."""
    fmt = container_for(backend, ds, split)
    stored = ds.require_split(split, res, fmt)
    if fmt is None:
        ds.source_dir(split, src)
    return stored


def _cannot_read(ds: PreppedDataset, backend: str, device: torch.device, reads) -> str | None:
    """Why `backend` cannot serve `reads` [(split, res or None)] on `device` (None: it can)."""
    b = TABLE[backend]
    if device.type not in b.devices:
        return f"runs on {' or '.join(b.devices)}"
    if not b.installed():
        return f"{', '.join(b.modules)} not installed"
    for split, res in reads:
        try:
            check_readable(ds, backend, split, res)
        except DataError as e:
            return str(e)
    return None


def choose_auto(ds: PreppedDataset, device, reads, order: tuple[str, ...] | None = None) -> tuple[str, str]:
    """Backend "auto": (the first backend of AUTO_ORDER[device] (or `order`) that is installed and can
    read every (split, res) of `reads`, one line saying why). One-line DataError, before any compute,
    naming each candidate's reason when none can read the data."""
    dev = resolve_device(device)
    why_not = []
    for name in order or AUTO_ORDER[dev.type]:
        reason = _cannot_read(ds, name, dev, reads)
        if reason is None:
            skipped = f"; not {', '.join(n for n, _ in why_not)}: " + "; ".join(f"{n}: {r}" for n, r in why_not) \
                if why_not else ""
            return name, f"backend auto -> {name} on {dev.type}{skipped}"
        why_not.append((name, reason))
    raise DataError(f"no loader backend can read {ds.root} on {dev.type}: "
                    + "; ".join(f"{n}: {r}" for n, r in why_not))

