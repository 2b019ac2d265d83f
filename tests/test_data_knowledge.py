"""Data knowledge written once: fastvit.manifest, fastvit.containers (the .beton reader), the backend
table (fastvit.data.backends), fastvit.augspec and fastvit.compat."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fastvit import compat, manifest
from fastvit.augspec import DEFAULT_AUG, AugSpec
from fastvit.containers import FIELD_META_TYPES, BetonFile, parse_index
from fastvit.data import DataError, make_loader, open_dataset
from fastvit.data import backends as B

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ manifest


def test_manifest_read_write_round_trip(tiny_prepped, tmp_path):
    m = manifest.read(tiny_prepped, checksums=True)
    assert m["version"] == manifest.VERSION and manifest.source_tree(m, tiny_prepped).is_dir()
    out = tmp_path / "copy"
    shutil.copytree(tiny_prepped, out, ignore=shutil.ignore_patterns(manifest.MANIFEST))
    assert manifest.write(out, m) == out / manifest.MANIFEST
    assert manifest.read(out) == m
    assert [p.name for p in out.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.parametrize("mutate, what", [
    (lambda m: m.update(version=7), "version 7"),
    (lambda m: m.update(resolutions=[0]), "'resolutions'"),
    (lambda m: m.pop("splits"), "'splits'"),
    (lambda m: m["splits"]["val"]["dali"]["32"]["index"].pop(), "equal length"),
    (lambda m: m["splits"]["train"]["ffcv"].update({"64": "ffcv/gone.beton"}), "missing file ffcv/gone.beton"),
])
def test_manifest_validator_rejects_a_broken_manifest_with_one_line(tiny_prepped, tmp_path, mutate, what):
    m = json.loads((tiny_prepped / manifest.MANIFEST).read_text())
    mutate(m)
    with pytest.raises(manifest.ManifestError) as ei:
        manifest.validate(m, tiny_prepped)
    msg = str(ei.value)
    assert "\n" not in msg and "bad manifest" in msg and what in msg
    # the same single validator answers for the loaders (DataError) and for fastvit-prep --verify
    out = tmp_path / "out"
    shutil.copytree(tiny_prepped, out)
    (out / manifest.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DataError, match=re.escape(what)):
        open_dataset(out)
    from fastvit.data_prep.verify import verify_dataset

    rep = verify_dataset(out, decode=False)
    assert not rep.ok and rep.problems == [msg.replace(str(tiny_prepped), str(out))]


def test_manifest_checksums_need_the_files_table(tiny_prepped):
    m = json.loads((tiny_prepped / manifest.MANIFEST).read_text())
    manifest.validate(m, tiny_prepped)
    m.pop("files")
    manifest.validate(m, tiny_prepped)  # the loaders do not need digests
    with pytest.raises(manifest.ManifestError, match="'files'"):
        manifest.validate(m, tiny_prepped, checksums=True)


def test_data_package_does_not_import_prep():
    for p in sorted((REPO / "fastvit" / "data").glob("*.py")):
        assert "data_prep" not in p.read_text(), p


# ------------------------------------------------------------------------------------------------ .beton


def test_beton_reader_round_trips_what_prep_writes(tmp_path):
    from fastvit.data_prep.beton import write_beton

    rng = np.random.default_rng(0)
    sizes = [int(s) for s in rng.integers(1, 5000, size=40)]
    blobs = [rng.integers(0, 256, size=s, dtype=np.uint8).tobytes() for s in sizes]
    widths, heights = rng.integers(1, 600, size=40).tolist(), rng.integers(1, 600, size=40).tolist()
    labels = rng.integers(0, 1000, size=40).tolist()
    d = write_beton(tmp_path / "x.beton", widths, heights, labels, sizes, iter(blobs))
    b = BetonFile(tmp_path / "x.beton")
    assert (b.num_samples, b.page_size, b.fields, b.field_names()) == (40, d["page_size"], ["image", "label"],
                                                                         ("image", "label"))
    assert b.labels.tolist() == labels and b.widths.tolist() == widths and b.heights.tolist() == heights
    assert b.sizes.tolist() == sizes and set(b.modes.tolist()) == {0}
    assert [bytes(b.data(i)) for i in range(40)] == blobs
    meta, head = b.head(3)
    assert head == blobs[:3] and meta["f1"].tolist() == labels[:3]


def test_beton_reader_agrees_with_ffcv(tiny_prepped):
    ffcv = pytest.importorskip("ffcv")
    from ffcv.reader import Reader
    from ffcv.types import TYPE_ID_HANDLER

    for tid, handler in TYPE_ID_HANDLER.items():  # our metadata dtypes mirror FFCV's fields
        if handler is not None and tid != 4 and tid != 6:  # ndarray fields need their arguments
            assert FIELD_META_TYPES[tid] == handler().metadata_type, (ffcv.__version__, tid)
    path = open_dataset(tiny_prepped).ffcv_path("train", 32)
    ours, theirs = BetonFile(path), Reader(str(path))
    assert ours.metadata.tobytes() == theirs.metadata.tobytes()
    assert np.array_equal(ours.alloc_table, theirs.alloc_table)


def test_bad_beton_and_index_are_one_line_errors(tmp_path):
    (tmp_path / "short.beton").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="too short"):
        BetonFile(tmp_path / "short.beton")
    with pytest.raises(ValueError, match="not a DALI webdataset index"):
        parse_index("hello\n", "x.idx")
    from fastvit.data.shards import open_beton

    with pytest.raises(DataError, match="too short"):
        open_beton(tmp_path / "short.beton")


# ------------------------------------------------------------------------------------------------ backends


def test_backend_table():
    assert B.BACKENDS == ("ffcv", "dali", "torchvision", "gpu_resident")
    import fastvit.data as D

    assert D.BACKENDS == B.BACKENDS
    assert {b.container for b in B.TABLE.values()} == {"ffcv", "dali", "source", "any"}
    assert all(set(b.devices) <= {"cpu", "cuda"} for b in B.TABLE.values())
    with pytest.raises(DataError, match="unknown backend 'nope'"):
        B.spec("nope")


def test_installed_uses_a_cached_import_check(monkeypatch):
    import importlib

    real = importlib.import_module
    asked = []

    def fake(name, *a, **k):
        asked.append(name)
        if name == "ffcv":
            raise ImportError("no ffcv here")
        return real(name, *a, **k)

    B._importable.cache_clear()
    monkeypatch.setattr(B.importlib, "import_module", fake)
    try:
        assert not B.installed("ffcv") and B.installed("torchvision")
        assert not B.installed("ffcv")
        assert asked.count("ffcv") == 1  # cached
        with pytest.raises(DataError, match="needs ffcv, which is not installed"):
            B.check_runnable("ffcv", torch.device("cpu"))
    finally:
        B._importable.cache_clear()


@pytest.mark.device_dependent
def test_resolve_device():
    assert B.resolve_device("cpu") == torch.device("cpu")
    assert B.resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DataError, match="cuda or cpu"):
        B.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DataError) as ei:
            B.resolve_device("cuda")
        assert "no CUDA GPU" in str(ei.value) and "\n" not in str(ei.value)


def test_container_for_and_check_readable(tiny_prepped, tmp_path):
    ds = open_dataset(tiny_prepped)
    assert [B.container_for(b, ds, "train") for b in B.BACKENDS] == ["ffcv", "dali", None, "ffcv"]
    assert B.check_readable(ds, "dali", "val", 48) == 64
    assert B.check_readable(ds, "torchvision", "val") is None
    m = json.loads((tiny_prepped / manifest.MANIFEST).read_text())
    for s in m["splits"].values():
        s.pop("ffcv")
    out = tmp_path / "dali_only"
    shutil.copytree(tiny_prepped, out, ignore=shutil.ignore_patterns(manifest.MANIFEST, "ffcv"))
    manifest.write(out, m)
    ds2 = open_dataset(out)
    assert B.container_for("gpu_resident", ds2, "train") == "dali"
    with pytest.raises(DataError, match="no ffcv files"):
        B.check_readable(ds2, "ffcv", "train")
    with pytest.raises(DataError, match="no 'test' split"):
        B.check_readable(ds2, "gpu_resident", "test")


# ------------------------------------------------------------------------------------------------ augmentation


def test_augspec_is_the_one_set_of_crop_constants():
    from fastvit.data_prep.options import PrepOptions

    a = AugSpec()
    assert a == DEFAULT_AUG and a.scale == (0.08, 1.0) and a.ratio == (3 / 4, 4 / 3) and a.flip == 0.5
    assert a.val_crop == 224 / 256 and a.val_resize_ratio == 256 / 224 and AugSpec.attempts == 10
    assert all(a.val_resize(r) == round(r * 256 / 224) for r in range(1, 2049))
    assert PrepOptions().size_ratio == a.val_resize_ratio
    for bad in ({"scale": (0.5, 0.1)}, {"flip": 2.0}, {"val_crop": 0.0}, {"ratio": (0, 1)}):
        with pytest.raises(ValueError):
            AugSpec(**bad)
    with pytest.raises(DataError, match="aug"):
        make_loader(None, backend="dali", device="cpu", aug="strong")
    from fastvit.data import LoaderOptions

    assert LoaderOptions.from_kwargs({"aug": {"flip": 0}}).aug == AugSpec(flip=0)   # a mapping is read as one


def test_build_loader_hands_the_augspec_to_the_backend(tiny_prepped):
    ds = open_dataset(tiny_prepped)
    kw = dict(split="val", res=32, batch_size=8, backend="gpu_resident", device="cpu", train=False, workers=1)
    with make_loader(ds, **kw) as a, make_loader(ds, aug=AugSpec(val_crop=1.0), **kw) as b:
        assert b.aug.val_crop == 1.0
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
    assert torch.equal(ya, yb) and not torch.equal(xa, xb)  # same images, a different crop


# ------------------------------------------------------------------------------------------------ compat


def test_compat_mixup_params_and_its_failure():
    from fastvit.train.augment import make_mixup

    mix = make_mixup(mixup=0.8, cutmix=0.0, label_smoothing=0.0, num_classes=4)
    mix.mix_prob = 1.0
    lam, cut = compat.mixup_params(mix)
    assert 0.0 <= lam <= 1.0 and cut is False
    with pytest.raises(RuntimeError, match=r"timm>=1.0,<1.1"):
        compat.mixup_params(object())


def test_compat_shutdowns_degrade_without_the_private_api():
    compat.shutdown_dali_pipeline(object())   # no _shutdown: left to garbage collection
    compat.shutdown_dataloader(None, None)

    class Pipe:
        closed = False

        def _shutdown(self):
            self.closed = True

    p = Pipe()
    compat.shutdown_dali_pipeline(p)
    assert p.closed
