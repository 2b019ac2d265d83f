"""DataSource: where a run's batches come from, resolved once and trusted by every loader after.

    src = DataSource.resolve(ds, "auto", "cuda", [("train", None), ("val", 224)])   # the one resolution
    src.backend, src.why            # "dali", "backend auto -> dali on cuda" (a concrete name, never "auto")
    src.device                      # torch.device("cuda")
    src.container("train")          # "ffcv" | "dali" | None (torchvision: the source tree)
    CurriculumLoader(src, stages, seed=0); make_val_loader(src, res=224, batch_size=500)   # resolve nothing

`reads` are the (split, res or None) the source will serve. Backend "auto" takes the first backend of
AUTO_ORDER[device] (or `prefer` first) that is installed and reads them all; a named backend is checked
against them (runs on the device, installed, has the files of its container or the source tree), so a
missing shard is found before any compute. A read at res None is a curriculum's (every stored
resolution): for gpu_resident it also fixes the streaming backend that a stage whose shard does not
fit in device memory falls back to.

The loaders still take (ds, backend, device) as before (`source_of`): they resolve them here, with the
same function, once per loader; a DataSource handed to them is used as it is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import (AUTO, AUTO_ORDER, BACKENDS, STREAMING, check_readable, check_runnable, choose_auto,
                       container_for, resolve_device, spec)
from .dataset import DataError, PreppedDataset, log


@dataclass(frozen=True)
class DataSource:
    ds: PreppedDataset
    device: torch.device
    backend: str                                      # one of BACKENDS (never "auto")
    containers: tuple[tuple[str, str | None], ...]    # (split, container the backend reads) for every split
    streaming: tuple[tuple[str, "DataSource | None", str], ...] = ()   # gpu_resident, per curriculum read:
    #                                 (split, the same data read by the streaming backend or None, why none)
    why: str = ""                                     # backend auto: which one and why (one line)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise DataError(f"a DataSource names a concrete backend ({', '.join(BACKENDS)}), not {self.backend!r}; "
                            f"DataSource.resolve chooses one for {AUTO!r}")
        if not isinstance(self.device, torch.device):
            raise DataError(f"a DataSource's device is a torch.device (DataSource.resolve), not {self.device!r}")

    @classmethod
    def resolve(cls, ds: PreppedDataset, backend: str | None = AUTO, device=None, reads=(), *, src=None,
                prefer: str | None = None) -> "DataSource":
        """The one resolution of device, backend and containers (see the module doc); one-line DataError
        when the device, the backend or the data does not do. `src`: the source JPEG tree when the
        manifest lacks it (torchvision); `prefer`: a backend "auto" tries first (fastvit-eval: the run's)."""
        auto = backend in (None, AUTO)
        if not auto:
            spec(backend)                     # an unknown name is reported before the device
        dev = resolve_device(device)
        why = ""
        if auto:
            order = tuple(dict.fromkeys([prefer, *AUTO_ORDER[dev.type]])) if prefer in BACKENDS else None
            backend, why = choose_auto(ds, dev, reads, order=order)   # checks every read of each candidate
        else:
            check_runnable(backend, dev)
            for split, res in reads:
                check_readable(ds, backend, split, res, src)
        streaming = tuple((split, *cls._streaming(ds, dev, split)) for split, res in dict.fromkeys(reads)
                          if res is None) if backend == "gpu_resident" else ()
        return cls(ds, dev, backend, _containers(ds, backend), streaming, why)

    @classmethod
    def _streaming(cls, ds: PreppedDataset, device: torch.device, split: str) -> tuple["DataSource | None", str]:
        """(the data read by the best streaming backend installed that reads every stored resolution of
        `split`, or None, why none): what a resident stage falls back to. Needed only when a shard does
        not fit, so a data set no streaming backend reads is fine until then."""
        try:
            name = choose_auto(ds, device, [(split, None)], order=STREAMING)[0]
        except DataError as e:
            return None, str(e)
        return cls(ds, device, name, _containers(ds, name)), ""

    def container(self, split: str) -> str | None:
        """The stored container this backend reads for `split`: "ffcv" or "dali"; None: the source tree."""
        for s, fmt in self.containers:
            if s == split:
                return fmt
        raise DataError(f"split {split!r} is not in {self.ds.root} (has {', '.join(sorted(self.ds.splits))})")

    def streaming_source(self, split: str) -> tuple["DataSource | None", str]:
        """gpu_resident: (the source a stage of `split` whose shard does not fit streams from, or None,
        why none), as resolved."""
        for s, source, why_not in self.streaming:
            if s == split:
                return source, why_not
        return None, f"the data source resolved no streaming backend for split {split!r}"


def _containers(ds: PreppedDataset, backend: str) -> tuple[tuple[str, str | None], ...]:
    return tuple((split, container_for(backend, ds, split)) for split in sorted(ds.splits))


def source_of(data, backend: str | None = AUTO, device="cuda", reads=(), *, src=None) -> DataSource:
    """A loader's DataSource: `data` itself when it is one (trusted: nothing is resolved or checked again;
    `backend` and `device` then stay at their defaults or agree with it), else
    `DataSource.resolve(data, backend, device, reads)`."""
    if not isinstance(data, DataSource):
        source = DataSource.resolve(data, backend, device, reads, src=src)
        if source.why:
            log.info(source.why)       # backend auto: the one chosen (set-up says it itself)
        return source
    if backend not in (AUTO, None, data.backend) or device not in ("cuda", None, data.device, str(data.device)):
        raise DataError(f"backend={backend!r}, device={device!r} given with a DataSource of {data.backend} on "
                        f"{data.device}: the source carries both")
    return data
