"""fastvit.data: prep output -> uint8 (B,3,r,r) batches on the device, stage by stage of the curriculum.

    ds = open_dataset(OUT)
    it = make_loader(ds, split="train", res=128, batch_size=256, backend="ffcv", device="cuda", seed=0)
    val = make_val_loader(ds, res=224, batch_size=500, backend="ffcv", device="cuda")
    cl = CurriculumLoader(ds, [Stage(64, 512, 1000), Stage(128, 256, 500)], backend="dali", device="cuda",
                          seed=0, start_step=0)
    for images, labels, stage in cl: ...
    source = DataSource.resolve(ds, "auto", "cuda", [("train", None), ("val", 224)])   # resolved once:
    cl = CurriculumLoader(source, stages); val = make_val_loader(source, res=224, batch_size=500)  # trusted

Backends (one table in backends.py: container read, devices, installed()): "ffcv" (.beton), "dali"
(webdataset tars + .idx), "torchvision" (source JPEG tree, the baseline), "gpu_resident" (a shard
decoded once into device memory, augmented there).
"""
from fastvit.stage import Stage

from .backends import BACKENDS, Backend, check_readable, container_for, installed, resolve_device
from .base import LoaderOptions
from .curriculum import CurriculumLoader, plan_spans
from .dataset import DataError, PreppedDataset, open_dataset, pick_stored_res
from .loader import make_loader, make_val_loader
from .order import BatchPlan, epoch_order, stage_seed
from .source import DataSource

__all__ = ["BACKENDS", "Backend", "BatchPlan", "CurriculumLoader", "DataError", "DataSource", "LoaderOptions",
           "PreppedDataset", "Stage", "check_readable", "container_for", "epoch_order", "installed", "make_loader",
           "make_val_loader", "open_dataset", "pick_stored_res", "plan_spans", "resolve_device", "stage_seed"]
