"""ImageNet scale without ImageNet (issue 24): the ImageNet-shaped demo tree, 1,000-class labels through
prep / ordering / DDP sharding / evaluation, and the planner's feed-rate model (fastvit.data.feed)."""
import json
import tarfile
from collections import Counter

import numpy as np
import pytest

from fastvit.data import BatchPlan, Stage, installed, open_dataset
from fastvit.data.feed import (FeedError, feed_verdict, load_decode_table, parse_decode_metrics, per_core_rate,
                               resident_bytes)
from fastvit.data_prep.cli import demo_kwargs, main as prep_main
from fastvit.data_prep.demo import (IMAGENET_TRAIN, imagenet_classes, imagenet_demo_kwargs, imagenet_train_counts,
                                    make_demo_dataset, scaled_counts)


# ---------------------------------------------------------------------------------------------------
# The ImageNet-shaped tree

def test_imagenet_counts_and_wnids():
    counts = imagenet_train_counts()
    assert len(counts) == 1000 and sum(counts) == IMAGENET_TRAIN == 1_281_167
    assert (min(counts), max(counts)) == (732, 1300)
    wnids = [w for w, _, _ in imagenet_classes()]
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000 and wnids[0] == "n01440764"
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in wnids)
    kw = imagenet_demo_kwargs(1.0)
    assert sum(kw["train_per_class"]) == 1_281_167 and sum(kw["val_per_class"]) == 50_000


@pytest.mark.parametrize("scale", [1.0, 0.1, 0.01, 0.0005])
def test_scaled_counts_keep_every_class(scale):
    counts = imagenet_train_counts()
    got = scaled_counts(counts, scale)
    assert len(got) == 1000 and min(got) >= 1
    assert got == [max(1, int(np.floor(scale * c + 0.5))) for c in counts]
    if scale == 0.1:
        assert got[counts.index(1300)] == 130 and got[counts.index(732)] == 73
    with pytest.raises(ValueError):
        scaled_counts(counts, 0)
    with pytest.raises(ValueError):
        scaled_counts(counts, 1.5)


def test_scaled_tree_has_exactly_the_requested_counts(tmp_path):
    # 12 ImageNet-like classes, their counts from the ImageNet table at F = 0.004 (1 to 5 per class)
    train = scaled_counts(imagenet_train_counts()[:12], 0.004)
    val = scaled_counts([50] * 12, 0.004)
    assert len(set(train)) > 1
    root = make_demo_dataset(tmp_path / "src", num_classes=12, imagenet_like=True, train_per_class=train,
                             val_per_class=val, min_side=24, max_side=32, workers=1)
    wnids = [w for w, _, _ in imagenet_classes(12)]
    for split, want in (("train", train), ("val", val)):
        assert sorted(p.name for p in (root / split).iterdir()) == wnids
        assert [len(list((root / split / w).glob("*.JPEG"))) for w in wnids] == want
    # a rerun after a deleted file rewrites exactly it
    victim = next((root / "train" / wnids[3]).glob("*.JPEG"))
    (root / ".demo-complete.json").unlink()
    victim.unlink()
    make_demo_dataset(tmp_path / "src", num_classes=12, imagenet_like=True, train_per_class=train,
                      val_per_class=val, min_side=24, max_side=32, workers=1)
    assert victim.is_file()
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path / "bad", num_classes=3, imagenet_like=True, train_per_class=[1, 2])


def test_cli_demo_scale_arguments(tmp_path, capsys):
    assert demo_kwargs("imagenet", 0.01)["train_per_class"] == scaled_counts(imagenet_train_counts(), 0.01)
    assert demo_kwargs("small", 0.5)["train_per_class"] == [30] * 10
    assert prep_main(["--demo", "--demo-size", "imagenet", "--demo-scale", "0", "--out", str(tmp_path / "o")]) == 2
    assert prep_main(["--demo-scale", "0.5", "--src", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("fastvit-prep: error:") for line in err)


# ---------------------------------------------------------------------------------------------------
# 1,000 classes through prep, ordering, DDP sharding and evaluation

@pytest.fixture(scope="module")
def thousand(tmp_path_factory):
    """fastvit-prep --demo --demo-size imagenet --demo-scale 0.0005: 1,000 classes x 1 train + 1 val image."""
    out = tmp_path_factory.mktemp("thousand") / "out"
    assert prep_main(["--demo", "--demo-size", "imagenet", "--demo-scale", "0.0005", "--out", str(out),
                      "--res", "32", "--workers", "2", "--no-progress"]) == 0
    return out


def _tar_labels(ds, split):
    """(wnid from the sample's file name, label from its .cls) of every sample in the split's tars."""
    tars, _ = ds.dali_shard(split, 32)
    out, names = [], {}
    for t in tars:
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                key, ext = m.name.rsplit(".", 1)
                names.setdefault(key, {})[ext] = tf.extractfile(m).read()
    for key, d in names.items():
        wnid = key.split("_", 1)[1].split("_")[0]
        out.append((wnid, int(d["cls"].decode())))
    return out


def test_thousand_class_labels_survive_prep(thousand):
    ds = open_dataset(thousand)
    wnids = [w for w, _, _ in imagenet_classes()]
    assert list(ds.classes) == wnids and ds.num_classes == 1000
    assert ds.count("train") == 1000 and ds.count("val") == 1000
    for split in ("train", "val"):
        pairs = _tar_labels(ds, split)
        assert len(pairs) == 1000
        assert all(ds.classes[label] == wnid for wnid, label in pairs)
        assert sorted(label for _, label in pairs) == list(range(1000))
        src = ds.accepted_images(split)
        assert all(ds.classes[label] == path.parent.name for path, label in src)
    m = json.loads((thousand / "manifest.json").read_text())
    assert m["classes"] == wnids


def test_thousand_class_labels_survive_ordering_and_ddp_sharding(thousand):
    from fastvit.data.shards import WdsShard

    ds = open_dataset(thousand)
    labels = WdsShard(*ds.dali_shard("train", 32)).labels
    n = len(labels)
    one = BatchPlan(n, [Stage(res=32, batch_size=200, steps=100)], [3])
    epoch = np.concatenate([one.batch(g).indices for g in range(one.batches_per_epoch())])
    assert sorted(labels[epoch].tolist()) == list(range(1000))  # every class once per epoch
    ranks = [BatchPlan(n, [Stage(res=32, batch_size=200, steps=100)], [3], rank=r, world=8) for r in range(8)]
    per_rank = [np.concatenate([p.batch(g).indices for g in range(p.batches_per_epoch())]) for p in ranks]
    union = np.concatenate(per_rank)
    assert len(set(union.tolist())) == len(union) == n                   # disjoint, covering
    assert sorted(labels[union].tolist()) == list(range(1000))
    for g in range(one.batches_per_epoch()):  # rank r's batch g is every 8th sample of global batch g
        glob = one.batch(g).indices
        assert sorted(np.concatenate([p.batch(g).indices for p in ranks]).tolist()) == sorted(glob.tolist())
    val = BatchPlan(1000, [Stage(res=32, batch_size=96, steps=100)], [0], drop_last=False, shuffle="fixed",
                    rank=5, world=8)
    assert sum(len(val.batch(g).indices) for g in range(val.batches_per_epoch())) == 125


def test_thousand_class_labels_survive_evaluation(thousand):
    import torch

    from fastvit.data import make_val_loader
    from fastvit.train.evaluate import evaluate

    backend = next((b for b in ("dali", "ffcv", "torchvision") if installed(b)), None)
    if backend is None:
        pytest.skip("no loader backend installed")
    ds = open_dataset(thousand)

    class Oracle(torch.nn.Module):
        """Predicts the label it is told; evaluation must score it 100 % only if labels stayed right."""

        def __init__(self):
            super().__init__()
            self.next = None

        def forward(self, images):
            return torch.nn.functional.one_hot(self.next, 1000).float() * 10

    seen = Counter()
    oracle = Oracle()

    def batches():
        it = make_val_loader(ds, res=32, batch_size=128, backend=backend, device="cpu", workers=1)
        try:
            for images, labels in it:
                assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.uint8
                seen.update(labels.tolist())
                oracle.next = labels.clone()
                yield images, labels
        finally:
            it.close()

    r = evaluate({"raw": oracle}, batches(), device=torch.device("cpu"), amp=False)["raw"]
    assert r["images"] == 1000 and r["top1"] == 100.0
    assert seen == Counter(range(1000))   # every class exactly once: the one val image per class


# ---------------------------------------------------------------------------------------------------
# The feed-rate model

TABLE = {"ffcv": {64: 17000.0, 128: 4700.0, 224: 1400.0}, "dali": {64: 9000.0, 224: 900.0}}


def test_per_core_rate_interpolates_and_scales():
    assert per_core_rate(TABLE["ffcv"], 128) == pytest.approx(4700.0)
    mid = per_core_rate(TABLE["ffcv"], 96)
    assert 4700 < mid < 17000
    assert mid == pytest.approx(np.exp(np.interp(np.log(96), np.log([64, 128]), np.log([17000, 4700]))))
    assert per_core_rate(TABLE["ffcv"], 32) == pytest.approx(17000 * 4)      # (64/32)^2
    assert per_core_rate(TABLE["ffcv"], 448) == pytest.approx(1400 / 4)
    with pytest.raises(FeedError):
        per_core_rate(TABLE["ffcv"], 0)


def test_feed_verdict_follows_from_the_rates():
    # 16 cores, one for the trainer: 15 x 4,700 = 70,500 img/s at 128 px
    ok = feed_verdict("ffcv", 128, step_img_s=27_000, cores=16, table=TABLE)
    assert (ok["workers"], ok["feed_img_s"], ok["data_bound"]) == (15, pytest.approx(70_500), False)
    assert ok["expected_img_s"] == 27_000 and "headroom" in ok["note"]
    # 224 px: 15 x 1,400 = 21,000 >= 8,000 -> fine; at 2 trainer cores 14 x 1,400 = 19,600
    assert not feed_verdict("ffcv", 224, 8_000, 16, TABLE)["data_bound"]
    assert feed_verdict("ffcv", 224, 8_000, 16, TABLE, trainer_cores=2)["feed_img_s"] == pytest.approx(19_600)
    # data-bound: the step wants more than the feed; expected rate is the feed; resident memory named
    bound = feed_verdict("ffcv", 224, 25_000, 16, TABLE, n=1_281_167, gpu_free_bytes=70 * 2**30)
    assert bound["data_bound"] and bound["expected_img_s"] == pytest.approx(21_000)
    assert bound["resident_bytes"] == 1_281_167 * 3 * 224 * 224 and bound["resident_fits"] is False
    assert bound["note"].startswith("data-bound") and "does not fit" in bound["note"]
    small = feed_verdict("dali", 64, 200_000, 16, TABLE, n=1_281_167, gpu_free_bytes=70 * 2**30)
    assert small["data_bound"] and small["resident_fits"] is True
    # exactly equal rates are not data-bound; one core still gets one worker
    assert not feed_verdict("ffcv", 128, 4_700, 2, TABLE)["data_bound"]
    assert feed_verdict("ffcv", 128, 1, 1, TABLE)["workers"] == 1
    with pytest.raises(FeedError):
        feed_verdict("nvjpeg", 128, 1000, 16, TABLE)
    with pytest.raises(FeedError):
        feed_verdict("ffcv", 128, 0, 16, TABLE)


def test_resident_bytes():
    assert resident_bytes(1_281_167, 64) == 15_742_980_096      # the "64 px ~ 15.7 GB"
    assert resident_bytes(1_281_167, 128) == 4 * resident_bytes(1_281_167, 64)
    with pytest.raises(FeedError):
        resident_bytes(-1, 64)


def test_load_decode_table(tmp_path):
    bench = {"machine": {}, "metrics": {"decode/ffcv_images_per_core_s@64": 17000.0,
                                        "decode/dali_cpu_images_per_core_s@64": 9000.0,
                                        "decode/dali_cpu_images_per_s@64": 5.0,
                                        "loader/ffcv_images_per_s@64": 1.0}}
    p = tmp_path / "decode.json"
    p.write_text(json.dumps(bench))
    assert load_decode_table(p) == {"ffcv": {64: 17000.0}, "dali": {64: 9000.0}}
    assert parse_decode_metrics(bench["metrics"]) == load_decode_table(p)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"ffcv": {"64": 100}}))
    assert load_decode_table(plain) == {"ffcv": {64: 100.0}}
    for bad in ("[]", "{}", '{"metrics": {"loader/x@64": 1}}', "not json"):
        p.write_text(bad)
        with pytest.raises(FeedError):
            load_decode_table(p)
    with pytest.raises(FeedError):
        load_decode_table(tmp_path / "missing.json")


def test_committed_decode_table_is_readable():
    from fastvit.data.feed import DEFAULT_TABLE

    if not DEFAULT_TABLE.is_file():
        pytest.skip("no committed decode table in this checkout")
    table = load_decode_table()
    assert {"ffcv", "dali"} <= set(table)
    assert all({64, 96, 128, 160, 224} <= set(rates) for rates in table.values())
    for rates in table.values():  # decode gets cheaper with fewer pixels
        assert rates[64] > rates[224]


def test_torchvision_sample_table_is_packed(tmp_path):
    """The torchvision backend keeps its n-sample table in numpy arrays, not a list of (Path, int): forked
    DataLoader workers would otherwise copy it page by page (bench/scale.py step fork_copy)."""
    from PIL import Image

    from fastvit.data.backend_torchvision import SourceImages, pack_samples

    files = []
    for i, name in enumerate(["ä.JPEG", "b c.JPEG", "dir/e.JPEG"]):
        f = tmp_path / name
        f.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8 + i, 8), (i * 60, 0, 0)).save(f, format="JPEG")
        files.append((f, 2 - i))
    ds = SourceImages(tmp_path, files, ["a", "b", "c", "d"])
    assert len(ds) == 3
    assert [ds.sample(i) for i in range(3)] == [(str(p), label) for p, label in files]
    assert [ds[i][1] for i in range(3)] == [2, 1, 0] and ds[1][0].size == (9, 8)
    assert not any(isinstance(v, list) and len(v) == 3 for v in vars(ds).values())
    buf, offsets, labels = pack_samples([])
    assert len(buf) == 0 and offsets.tolist() == [0] and len(labels) == 0


def _frozen_objects(_task) -> int:
    import gc

    return gc.get_freeze_count()


def test_prep_workers_are_forked_with_the_parents_objects_frozen():
    """prep's workers freeze what they inherit first thing (worker_init): their GC never walks (and so
    never copies) the parent's objects (prep's source list, the records of finished shards); the parent's
    own collection is untouched."""
    import gc
    import sys

    from fastvit.data_prep.workers import ordered_map

    if not sys.platform.startswith("linux"):
        pytest.skip("workers are forked on Linux only")
    parent_objects = [[i] for i in range(1000)]  # noqa: F841 -- something to freeze
    counts = list(ordered_map(_frozen_objects, range(6), workers=2, window=2))
    assert len(counts) == 6 and min(counts) > 1000
    assert gc.get_freeze_count() == 0


def test_scale_growth_table_exponent_and_line(tmp_path):
    """bench/scale.py --table: k of cost ~ n^k and the straight line to F = 1 follow from the runs' numbers."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_scale", Path(__file__).parents[1] / "bench" / "scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def run(scale, n, cpu, manifest):
        return {"scale": scale, "n_train": n, "n_val": n // 10,
                "steps": {"prep": {"cpu_s": cpu, "manifest_bytes": manifest}}}

    small, large = run(0.01, 10_000, 5.0, 1000), run(0.1, 100_000, 50.0, 1000)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in mod.growth_table(small, large).splitlines() if line.startswith("| ")}
    assert rows["prep CPU seconds"][2] == "1"                         # linear: k = 1
    assert rows["prep CPU seconds"][4] == "641"                       # 1,281,167 x 5 / 10,000 s
    assert rows["manifest bytes"][2] == "0" and rows["manifest bytes"][4] == "1,000"  # flat
    for name, path in ((tmp_path / "a.json", small), (tmp_path / "b.json", large)):
        name.write_text(json.dumps(path))
    assert "### growth between F=0.01 and F=0.1" in mod.tables([str(tmp_path / "b.json"), str(tmp_path / "a.json")])
