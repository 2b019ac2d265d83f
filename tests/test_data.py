"""fastvit.data: manifest checks, batch order, every backend's batches (CPU), DALI's in-pipeline size switch.

One compiled FFCV loader is shared by the module (numba compiles each pipeline, ~10-40 s here); the
other FFCV checks run its pipeline uncompiled (ffcv_jit=False), which is the same code path in Python.
"""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch

from fastvit.data import (BatchPlan, DataError, Stage, epoch_order, make_loader, make_val_loader, open_dataset,
                          pick_stored_res, stage_seed)

try:                       # optional: without it the process checks are skipped, the thread checks still run
    import psutil
except ImportError:
    psutil = None

N_TRAIN, N_VAL, CLASSES = 64, 24, 4  # tiny_src: 4 classes x (16 train, 6 val)


@pytest.fixture(scope="module")
def ds(tiny_prepped):
    return open_dataset(tiny_prepped)


@pytest.fixture(scope="module")
def true_labels(ds, tiny_src):
    """Label of stored sample i per split, from the source tree's folders (ImageFolder order = prep order)."""
    from torchvision.datasets import ImageFolder

    out = {}
    for split in ("train", "val"):
        folder = ImageFolder(str(tiny_src / split))
        assert folder.classes == list(ds.classes)
        out[split] = np.asarray(folder.targets, dtype=np.int64)
    return out


def _children():
    return psutil.Process().children(recursive=True) if psutil is not None else None


def _no_leaks(before_threads, before_children):
    after = {t for t in threading.enumerate() if t.is_alive()}
    assert after <= before_threads, f"threads left: {after - before_threads}"
    if psutil is not None:
        assert psutil.Process().children(recursive=True) == before_children


# ------------------------------------------------------------------------------------------------ manifest


def test_open_dataset_reads_tiny_manifest(ds, tiny_src):
    assert ds.classes == tuple(sorted(p.name for p in (tiny_src / "train").iterdir()))
    assert ds.count("train") == N_TRAIN and ds.count("val") == N_VAL
    assert ds.resolutions == (32, 64)
    assert ds.src is not None and ds.source_dir("train") == ds.src / "train"
    assert ds.stored_res(24) == 32 and ds.stored_res(32) == 32 and ds.stored_res(48) == 64
    assert ds.stored_res(128) == 64  # larger than anything stored: the largest


def test_pick_stored_res_rule():
    assert pick_stored_res(64, [224, 64, 128]) == 64
    assert pick_stored_res(65, [224, 64, 128]) == 128
    assert pick_stored_res(300, [224, 64, 128]) == 224
    assert pick_stored_res(1, [224, 64, 128]) == 64


def test_open_dataset_errors(tmp_path, tiny_prepped):
    with pytest.raises(DataError, match="not a directory"):
        open_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="manifest.json not found"):
        open_dataset(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(DataError, match="cannot read manifest"):
        open_dataset(tmp_path)
    good = json.loads((tiny_prepped / "manifest.json").read_text())
    for mutate, msg in [(lambda m: m.update(version=99), "version"),
                        (lambda m: m.update(classes=[]), "classes"),
                        (lambda m: m["splits"]["train"].pop("count"), "count"),
                        (lambda m: m["splits"]["train"]["ffcv"].update({"32": "ffcv/missing.beton"}), "missing file")]:
        m = json.loads(json.dumps(good))
        mutate(m)
        (tmp_path / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(DataError, match=msg):
            open_dataset(tmp_path)


def test_make_loader_usage_errors(ds):
    with pytest.raises(DataError, match="unknown loader option"):
        make_loader(ds, res=32, batch_size=8, backend="dali", device="cpu", bogus=1)
    with pytest.raises(DataError, match="unknown backend"):
        make_loader(ds, res=32, batch_size=8, backend="nope", device="cpu")
    with pytest.raises(DataError, match="split 'test'"):
        make_loader(ds, split="test", res=32, batch_size=8, backend="dali", device="cpu")
    with pytest.raises(DataError, match="res_schedule"):
        make_loader(ds, res=32, batch_size=8, backend="torchvision", device="cpu", workers=0, res_schedule=lambda g: 32)


def test_torchvision_needs_a_source_tree(ds, tmp_path):
    m = json.loads((ds.root / "manifest.json").read_text())
    m.pop("src")
    shutil.copytree(ds.root, tmp_path / "out", ignore=shutil.ignore_patterns("manifest.json"))
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(m))
    ds2 = open_dataset(tmp_path / "out")
    with pytest.raises(DataError, match="pass src="):
        make_loader(ds2, res=32, batch_size=8, backend="torchvision", device="cpu", workers=0)
    it = make_loader(ds2, res=32, batch_size=8, backend="torchvision", device="cpu", workers=0, src=str(ds.src))
    assert len(it) == N_TRAIN // 8
    it.close()


# ------------------------------------------------------------------------------------------------ order


def test_batch_plan_epochs_are_permutations_and_seeded():
    plan = BatchPlan(50, [Stage(res=32, batch_size=8)], [7], endless=True)
    assert plan.batches_per_epoch() == 6
    for epoch in range(3):
        idx = np.concatenate([plan.batch(epoch * 6 + b).indices for b in range(6)])
        assert len(idx) == 48 and len(set(idx.tolist())) == 48  # 2 dropped (drop_last)
        assert set(idx.tolist()) | set(epoch_order(50, 7, epoch)[48:].tolist()) == set(range(50))
    assert plan.epoch_end(0) == 6 and plan.epoch_end(7) == 12
    same = BatchPlan(50, [Stage(32, 8)], [7], endless=True)
    other = BatchPlan(50, [Stage(32, 8)], [8], endless=True)
    assert all((plan.batch(g).indices == same.batch(g).indices).all() for g in range(12))
    assert any((plan.batch(g).indices != other.batch(g).indices).any() for g in range(6))
    assert not (plan.batch(0).indices == plan.batch(6).indices).all()  # epochs reshuffle
    keep = BatchPlan(50, [Stage(32, 8)], [7], endless=True, drop_last=False, shuffle=False)
    assert keep.batches_per_epoch() == 7 and keep.batch(6).indices.tolist() == [48, 49]


def test_batch_plan_stages_start_fresh_epochs():
    stages, seeds = [Stage(32, 8, 10), Stage(64, 4, 5)], [stage_seed(0, 0), stage_seed(0, 1)]
    plan = BatchPlan(40, stages, seeds)
    assert plan.total_steps == 15 and plan.locate(9) == (0, 9) and plan.locate(10) == (1, 0)
    assert plan.batch(5).epoch == 1 and plan.batch(5).index_in_epoch == 0  # 5 batches per epoch at bs 8
    s = plan.batch(10)
    assert (s.stage, s.res, s.epoch, s.index_in_epoch) == (1, 64, 0, 0)
    alone = BatchPlan(40, [stages[1]], [seeds[1]])
    assert (s.indices == alone.batch(0).indices).all()  # a stage's order does not depend on what preceded it
    with pytest.raises(IndexError):
        plan.batch(15)
    assert stage_seed(0, 0) != stage_seed(0, 1) and stage_seed(0, 1) == stage_seed(0, 1)


# ------------------------------------------------------------------------------------------------ backends


@pytest.fixture(scope="module")
def ffcv_compiled(ds):
    """The one compiled FFCV train loader of this module (res 32, batch 8)."""
    it = make_loader(ds, "train", res=32, batch_size=8, backend="ffcv", device="cpu", seed=5, workers=2)
    yield it
    it.close()


def test_ffcv_compiled_batches(ffcv_compiled, true_labels):
    it = ffcv_compiled
    assert len(it) == N_TRAIN // 8
    for epoch in range(2):
        seen = []
        for b, (images, labels) in enumerate(it):
            assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8
            assert labels.shape == (8,) and labels.dtype == torch.int64
            spec = it.plan.batch(epoch * len(it) + b)
            assert labels.tolist() == true_labels["train"][spec.indices].tolist()
            seen += spec.indices.tolist()
        assert sorted(seen) == list(range(N_TRAIN))  # every image exactly once (64 = 8 x 8: nothing dropped)


@pytest.mark.parametrize("backend", ["dali", "gpu_resident", "torchvision", "ffcv"])
def test_train_batches_per_backend(ds, backend, true_labels):
    kw = {"ffcv_jit": False} if backend == "ffcv" else {}
    # torchvision in-process here (workers=0); its worker processes are exercised by the close test.
    it = make_loader(ds, "train", res=48, batch_size=10, backend=backend, device="cpu", seed=3,
                     workers=2 if backend != "torchvision" else 0, **kw)
    assert len(it) == N_TRAIN // 10
    labels_seen = []
    for epoch in range(2):
        idx = []
        for b, (images, labels) in enumerate(it):
            assert images.shape == (10, 3, 48, 48) and images.dtype == torch.uint8 and images.device.type == "cpu"
            assert labels.shape == (10,) and labels.dtype == torch.int64
            assert 0 <= int(labels.min()) and int(labels.max()) < CLASSES
            spec = it.plan.batch(epoch * len(it) + b)
            assert labels.tolist() == true_labels["train"][spec.indices].tolist()
            assert images.float().std() > 0  # real pixels, not an empty buffer
            idx += spec.indices.tolist()
            labels_seen += labels.tolist()
        assert len(idx) == 60 and len(set(idx)) == 60  # once per epoch; 4 dropped by drop_last
    it.close()
    # Same seed -> same order, whichever backend: the label sequence of a second loader matches.
    again = make_loader(ds, "train", res=32, batch_size=10, backend="dali", device="cpu", seed=3, workers=1)
    assert [y for _ in range(2) for _, ys in again for y in ys.tolist()] == labels_seen
    again.close()


@pytest.mark.parametrize("backend", ["dali", "gpu_resident", "torchvision", "ffcv"])
def test_val_loader_every_image_once_in_a_fixed_order(ds, backend, true_labels):
    kw = {"ffcv_jit": False} if backend == "ffcv" else {}
    it = make_val_loader(ds, res=32, batch_size=10, backend=backend, device="cpu",
                         workers=0 if backend == "torchvision" else 1, **kw)
    assert len(it) == 3  # 24 images: 10 + 10 + 4
    batches = list(it)
    assert [b[0].shape for b in batches] == [(10, 3, 32, 32), (10, 3, 32, 32), (4, 3, 32, 32)]
    labels = torch.cat([b[1] for b in batches])
    perm = epoch_order(24, 0, 0, "fixed")
    assert sorted(perm.tolist()) == list(range(24))  # every image once, nothing dropped
    assert perm.tolist() != list(range(24))          # shuffled: a capped prefix is not the first classes
    assert labels.tolist() == [true_labels["val"].tolist()[i] for i in perm]
    again = torch.cat([b[1] for b in it])             # a second pass: the whole epoch, same order
    assert again.tolist() == labels.tolist()
    it.close()


def test_start_batch_resumes_mid_epoch(ds):
    full = make_loader(ds, "train", res=32, batch_size=8, backend="gpu_resident", device="cpu", seed=2, workers=1)
    ref = [full.next_batch() for _ in range(13)]
    resumed = make_loader(ds, "train", res=32, batch_size=8, backend="gpu_resident", device="cpu", seed=2,
                          workers=1, start_batch=5)
    first_pass = list(resumed)  # the rest of epoch 0
    assert len(first_pass) == 3
    rest = first_pass + [resumed.next_batch() for _ in range(5)]
    for (xa, ya), (xb, yb) in zip(ref[5:], rest):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)  # GPU-resident crops are seeded per batch too
    full.close()
    resumed.close()


def test_dali_size_change_lands_on_the_planned_batch(ds):
    """The prefetch queue runs ahead of the consumer; the size still changes at exactly batch 5."""
    it = make_loader(ds, "train", res=32, batch_size=8, backend="dali", device="cpu", seed=0, workers=2,
                     batches_ahead=3, res_schedule=lambda g: 32 if g < 5 else 48)
    sides, scheduled_when_consumed = [], []
    for _ in range(12):  # spans an epoch boundary (8 batches per epoch)
        images, _ = it.next_batch()
        sides.append(images.shape[-1])
        scheduled_when_consumed.append(len(it.source.calls))
    assert sides == [32] * 5 + [48] * 7
    assert scheduled_when_consumed[4] > 5  # batch 5 (and later) was already scheduled when batch 4 came out
    it.close()


def test_dali_stock_webdataset_reader(ds, true_labels):
    it = make_loader(ds, "train", res=32, batch_size=8, backend="dali", device="cpu", seed=0, workers=1,
                     dali_reader="webdataset", res_schedule=lambda g: 32 if g < 3 else 40)
    out = [it.next_batch() for _ in range(6)]
    assert [x.shape[-1] for x, _ in out] == [32, 32, 32, 40, 40, 40]
    labels = torch.cat([y for _, y in out])
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= set(range(CLASSES))
    it.close()


def test_gpu_resident_crop_matches_interpolate():
    from fastvit.data.backend_resident import center_boxes, crop_resize_flat, random_resized_boxes

    g = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g) for h, w in [(20, 30), (17, 17)]]
    data = torch.cat([i.reshape(-1) for i in imgs])
    offsets = torch.tensor([0, 20 * 30 * 3])
    hs, ws = torch.tensor([20, 17]), torch.tensor([30, 17])
    boxes = torch.tensor([[0, 0, 20, 30], [2, 3, 10, 12]], dtype=torch.float32)
    out = crop_resize_flat(data, offsets, hs, ws, boxes, torch.tensor([False, True]), 8)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.uint8
    for k, (img, (t, l, h, w), flip) in enumerate(zip(imgs, boxes.long().tolist(), [False, True])):
        crop = img[t:t + h, l:l + w].permute(2, 0, 1)[None].float()
        ref = torch.nn.functional.interpolate(crop, size=(8, 8), mode="bilinear", align_corners=False)
        ref = ref.round().clamp(0, 255)[0]
        if flip:
            ref = ref.flip(-1)
        assert (out[k].float() - ref).abs().max() <= 1  # rounding only
    rng = np.random.default_rng(0)
    h, w = rng.integers(10, 300, 500), rng.integers(10, 300, 500)
    b = random_resized_boxes(h, w, rng)
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] >= 1).all() and (b[:, 3] >= 1).all()
    assert (b[:, 0] + b[:, 2] <= h).all() and (b[:, 1] + b[:, 3] <= w).all()
    c = center_boxes(h, w)
    assert (c[:, 2] == (224 / 256 * np.minimum(h, w)).astype(int)).all()


@pytest.mark.parametrize("backend", ["dali", "torchvision", "ffcv"])
def test_close_leaves_no_threads_or_processes(ds, backend):
    if psutil is None and backend == "torchvision":
        pytest.skip("psutil is not installed: the torchvision loader's worker processes cannot be listed")
    threads, children = set(threading.enumerate()), _children()
    kw = {"ffcv_jit": False} if backend == "ffcv" else {}
    it = make_loader(ds, "train", res=32, batch_size=8, backend=backend, device="cpu", seed=0, workers=2, **kw)
    for _ in range(3):  # mid-epoch, with workers / producer threads busy prefetching
        it.next_batch()
    if backend == "torchvision":
        assert len(psutil.Process().children(recursive=True)) >= 2
    it.close()
    _no_leaks(threads, children)
    with pytest.raises(DataError, match="closed"):
        it.next_batch()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "ffcv", "dali", "gpu_resident", "torchvision"])
def test_cuda_batches(ds, backend):
    from fastvit.data.backends import installed

    if backend != "auto" and not installed(backend):   # the GPU machine may lack FFCV and DALI
        pytest.skip(f"{backend} is not installed here")
    it = make_loader(ds, "train", res=32, batch_size=8, backend=backend, device="cuda", seed=0, workers=2)
    images, labels = it.next_batch()
    assert images.is_cuda and labels.is_cuda and images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    it.close()


def test_parse_ascii_labels():
    from fastvit.data.backend_dali import parse_ascii_labels

    padded = torch.zeros(3, 12, dtype=torch.uint8)
    for i, s in enumerate([b"7", b"42", b"999"]):
        padded[i, :len(s)] = torch.tensor(list(s), dtype=torch.uint8)
    assert parse_ascii_labels(padded).tolist() == [7, 42, 999]
