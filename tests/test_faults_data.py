"""Fault matrix of the data side (issue #11): bad source images, kill -9 of fastvit-prep at several points,
disk full, readers of the source tree, hung bench sections. Each test states the outcome and the work lost;
docs/faults.md's "Faults: data, prep, bench" table lists the same rows.

Covered elsewhere and listed in the table too: text file named .JPEG, zero-byte, truncated, PNG named .JPEG,
CMYK and grayscale JPEGs (test_prep_inputs.py::test_awkward_inputs); kill -9 in the middle of a shard,
Ctrl-C, a corrupted finished file (test_prep_resume.py).
"""
from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from fastvit.data import DataError, make_loader, open_dataset
from fastvit.data_prep import PrepError, codec, prep_dataset
from fastvit.data_prep.cli import main as prep_main

from test_prep_resume import kill_9_when, processes_writing, wait_for

SHARD = 20


def jpeg(w: int, h: int, color=(200, 40, 40), quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def bomb_jpeg(w: int = 20000, h: int = 20000) -> bytes:
    """A 16x16 quality-1 JPEG whose header declares w x h: ~600 bytes on disk, 1.2 GB if decoded."""
    b = bytearray(jpeg(16, 16, quality=1))
    i = b.index(b"\xff\xc0")  # SOF0: length(2) precision(1) height(2) width(2)
    b[i + 5:i + 7], b[i + 7:i + 9] = h.to_bytes(2, "big"), w.to_bytes(2, "big")
    return bytes(b)


def add_bad_files(train: Path) -> dict[str, str]:
    """Unreadable files a real tree holds, in train/'s first two classes; {relative path: skip reason}."""
    c0, c1 = sorted(d for d in train.iterdir() if d.is_dir())[:2]
    good = sorted(c1.iterdir())[0].read_bytes()
    (c0 / "zz_text.JPEG").write_text("this is a text file, not a JPEG\n" * 20)
    (c0 / "zz_empty.JPEG").write_bytes(b"")
    (c1 / "zz_truncated.JPEG").write_bytes(good[: len(good) // 2])
    return {f"train/{c0.name}/zz_text.JPEG": "not an image", f"train/{c0.name}/zz_empty.JPEG": "empty file",
            f"train/{c1.name}/zz_truncated.JPEG": "truncated image"}


@pytest.fixture(scope="module")
def bad_tree(tiny_src, tmp_path_factory) -> tuple[Path, Path, dict]:
    """tiny_src + a text file named .JPEG, a zero-byte and a truncated JPEG in train/; prepped (max_bad=1)."""
    root = tmp_path_factory.mktemp("bad_tree")
    src = root / "src"
    shutil.copytree(tiny_src, src)
    bad = add_bad_files(src / "train")
    out = root / "out"
    prep_dataset(src, out, resolutions=[32], workers=1, progress=False, max_bad=1.0)
    return src, out, bad


# ------------------------------------------------------------------------------------------ bad images


@pytest.mark.parametrize("use_turbojpeg", [True, False], ids=["turbojpeg", "pillow"])
def test_bomb_tiny_and_unreadable_images(tmp_path, use_turbojpeg):
    """20000x20000 header: skipped 'too large', never decoded; 1x1: kept at 1x1; a dangling link and (not as
    root) a file without read permission: skipped 'cannot read'. The rest of the split is written."""
    src = tmp_path / "src"
    cls = src / "train" / "n00000001"
    cls.mkdir(parents=True)
    for i in range(3):
        (cls / f"a_{i}.JPEG").write_bytes(jpeg(40 + 8 * i, 36))
    (cls / "b_bomb.JPEG").write_bytes(bomb_jpeg())
    (cls / "c_tiny.JPEG").write_bytes(jpeg(1, 1))
    (cls / "d_dangling.JPEG").symlink_to(tmp_path / "gone.JPEG")
    expect = {"b_bomb.JPEG": "too large", "d_dangling.JPEG": "cannot read (No such file or directory)"}
    if os.geteuid() != 0:  # root reads anything
        (cls / "e_no_permission.JPEG").write_bytes(jpeg(40, 40))
        (cls / "e_no_permission.JPEG").chmod(0)
        expect["e_no_permission.JPEG"] = "cannot read (Permission denied)"

    tracemalloc.start()
    try:
        m = prep_dataset(src, tmp_path / "out", resolutions=[32, 64], formats=("dali",), splits=("train",),
                         workers=1, progress=False, max_bad=1.0, use_turbojpeg=use_turbojpeg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB allocated: the bomb was decoded"
    tr = m["splits"]["train"]
    skipped = {Path(s["path"]).name: s["reason"] for s in tr["skipped"]}
    assert skipped.keys() == expect.keys()
    for name, why in expect.items():
        assert skipped[name].startswith(why), (name, skipped[name])
    # refused from the header on either path (TurboJPEG: our guard; Pillow: its DecompressionBombError)
    assert ("20000x20000" if use_turbojpeg else "400000000 pixels") in skipped["b_bomb.JPEG"]
    assert tr["count"] == 4 and tr["images"]["64"]["min_short_side"] == 1  # the 1x1 image, never upscaled


def test_bomb_guard_in_the_codec():
    """Either decode path refuses more than Pillow's limit (what every PIL reader refuses), from the header."""
    assert codec.MAX_PIXELS == 2 * Image.MAX_IMAGE_PIXELS
    for tj in (True, False):
        with pytest.raises(codec.BadImage, match="too large"):
            codec.transcode(bomb_jpeg(), [64], 256 / 224, 90, use_turbojpeg=tj)


# ------------------------------------------------------------------------------ readers of the source tree


def test_torchvision_reads_only_what_prep_accepted(bad_tree):
    src, out, bad = bad_tree
    ds = open_dataset(out)
    tr = ds.manifest["splits"]["train"]
    assert {s["path"]: s["reason"] for s in tr["skipped"]} == bad
    acc = ds.accepted_images("train")
    assert len(acc) == tr["count"] == 64
    assert not {str(p.relative_to(src)) for p, _ in acc} & set(bad)
    assert all(ds.classes[label] == p.parent.name for p, label in acc)
    # in prep's order: sample i is the i-th image of the DALI tars (keys carry the source index and stem)
    tar = (out / tr["dali"]["32"]["tars"][0]).read_bytes()
    stems = [p.stem for p, _ in acc]
    assert [tar.index(f"_{s}.jpg".encode()) for s in stems] == sorted(tar.index(f"_{s}.jpg".encode()) for s in stems)

    it = make_loader(ds, res=32, batch_size=16, backend="torchvision", device="cpu", workers=1, seed=0)
    try:
        labels = []
        for _ in range(len(it)):  # a whole epoch: the unreadable files would crash a DataLoader worker
            images, y = it.next_batch()
            assert images.shape == (16, 3, 32, 32)
            labels += y.tolist()
        assert sorted(labels) == sorted(label for _, label in acc)
    finally:
        it.close()


def test_file_changed_after_prep_is_replaced_and_counted(bad_tree, tmp_path, caplog):
    """A source image that fails at read time anyway: replaced by the next sample (batch shape kept),
    logged with a count; a tree with other files than prep read: one-line DataError."""
    src, out, _ = bad_tree
    src2 = tmp_path / "src"
    shutil.copytree(src, src2)
    m = json.loads((out / "manifest.json").read_text())
    m["src"] = str(src2)
    out2 = tmp_path / "out"
    shutil.copytree(out, out2, ignore=shutil.ignore_patterns("manifest.json"))
    (out2 / "manifest.json").write_text(json.dumps(m))
    ds = open_dataset(out2)
    victim = ds.accepted_images("train")[3][0]
    victim.write_bytes(b"overwritten after prep")
    it = make_loader(ds, res=32, batch_size=64, backend="torchvision", device="cpu", workers=0, seed=0,
                     order="sequential")
    try:
        with caplog.at_level(logging.WARNING, logger="fastvit.data"):
            images, y = it.next_batch()
        assert images.shape == (64, 3, 32, 32)
        assert it.dataset.unreadable == 1
        assert any(str(victim) in r.getMessage() and "1 unreadable so far" in r.getMessage() for r in caplog.records)
    finally:
        it.close()
    (victim.parent / "zz_new.JPEG").write_bytes(jpeg(40, 40))  # a file prep never saw
    with pytest.raises(DataError, match="changed since fastvit-prep"):
        make_loader(ds, res=32, batch_size=8, backend="torchvision", device="cpu", workers=0)


# -------------------------------------------------------------------------------------- kill -9 points

HOOKED_PREP = """
import importlib, pathlib, sys, time
mod, name, nth, marker = sys.argv[1:5]
m = importlib.import_module(mod)
orig, calls = getattr(m, name), [0]
def hook(*a, **k):
    calls[0] += 1
    if calls[0] == int(nth):
        pathlib.Path(marker).touch()
        time.sleep(600)
    return orig(*a, **k)
setattr(m, name, hook)
from fastvit.data_prep.cli import main
sys.exit(main(sys.argv[5:]))
"""


def prep_args(src: Path, out: Path) -> list[str]:
    return ["--src", str(src), "--out", str(out), "--res", "32", "--workers", "1", "--shard-size", str(SHARD),
            "--no-progress"]


@pytest.fixture(scope="module")
def fresh(tiny_src, tmp_path_factory) -> dict:
    """The manifest of one uninterrupted run with the settings the kill tests use."""
    out = tmp_path_factory.mktemp("fresh") / "out"
    assert prep_main(prep_args(tiny_src, out)) == 0
    return json.loads((out / "manifest.json").read_text())


def final_files(out: Path) -> dict[str, int]:
    """Files under their final names in ffcv/ and dali/, with their mtimes."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for d in ("ffcv", "dali") if (out / d).is_dir()
            for p in (out / d).iterdir() if ".tmp-" not in p.name}


# point: (module, function, nth call it blocks in) -> what a rerun keeps (finished files it does not rewrite)
KILL_POINTS = {
    "first_chunk": ("fastvit.data_prep.prep", "transcode_chunk", 1, "nothing"),
    "train_shard_1": ("fastvit.data_prep.prep", "transcode_chunk", 3, "train shard 0"),
    "train_beton": ("fastvit.data_prep.prep", "write_beton", 1, "train's 4 shards"),
    "val_split": ("fastvit.data_prep.prep", "_run_split", 2, "train (shards + .beton)"),
    "manifest": ("fastvit.manifest", "write", 1, "everything"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_at_each_point_then_resume(point, tiny_src, fresh, tmp_path):
    mod, fn, nth, _ = KILL_POINTS[point]
    out, marker = tmp_path / "out", tmp_path / "reached"
    proc = subprocess.Popen([sys.executable, "-c", HOOKED_PREP, mod, fn, str(nth), str(marker)]
                            + prep_args(tiny_src, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_9_when(proc, marker.exists)
    wait_for(lambda: not processes_writing(out), timeout=10)
    assert not (out / "manifest.json").exists()
    kept = final_files(out)  # what the killed run finished: a rerun must reuse it untouched
    train_tars = {r for r in fresh["files"] if r.startswith("dali/train_")}
    expect_kept = {"first_chunk": set(), "train_shard_1": {r for r in train_tars if r.endswith("_000000.tar")
                                                           or r.endswith("_000000.idx")},
                   "train_beton": train_tars, "val_split": train_tars | {"ffcv/train_32.beton"},
                   "manifest": set(fresh["files"])}[point]
    assert set(kept) == expect_kept

    assert prep_main(prep_args(tiny_src, out)) == 0
    resumed = json.loads((out / "manifest.json").read_text())
    assert resumed["files"] == fresh["files"] and resumed["splits"] == fresh["splits"]
    assert {r: t for r, t in final_files(out).items() if r in kept} == kept, "finished files are reused"
    assert not (out / ".work").exists() and not any(".tmp-" in p.name for p in out.rglob("*"))


# ------------------------------------------------------------------------------------------- disk full


@pytest.mark.parametrize("at", ["shard", "beton"])
def test_disk_full_one_line_then_identical_resume(at, tiny_src, fresh, tmp_path, monkeypatch, capsys):
    """ENOSPC in a shard tar, or while the .beton is assembled: one line, exit 1; finished shards stay;
    after 'freeing space' the same command resumes to the uninterrupted run's bytes."""
    from fastvit import fileio

    real_write, calls = fileio.HashingWriter.write, {"n": 0, "beton": False}

    def full(self, b):
        calls["n"] += 1
        if (calls["n"] == 40) if at == "shard" else self.path.suffix == ".beton":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, b)

    monkeypatch.setattr(fileio.HashingWriter, "write", full)
    out = tmp_path / "out"
    assert prep_main(prep_args(tiny_src, out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastvit-prep: error: disk full while writing") and "resume" in err[0]
    kept = final_files(out)
    assert kept and not any(".tmp-" in p.name for p in out.rglob("*"))
    if at == "beton":  # every train shard was finished before the .beton: all of them are kept
        assert set(kept) == {r for r in fresh["files"] if r.startswith("dali/train_")}
    monkeypatch.setattr(fileio.HashingWriter, "write", real_write)
    assert prep_main(prep_args(tiny_src, out)) == 0
    resumed = json.loads((out / "manifest.json").read_text())
    assert resumed["files"] == fresh["files"] and resumed["splits"] == fresh["splits"]
    assert {r: t for r, t in final_files(out).items() if r in kept} == kept


# ---------------------------------------------------------------------------------------- bench sections


@pytest.fixture()
def bench():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"
    spec = importlib.util.spec_from_file_location("fastvit_bench_throughput", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hung_and_dying_sections_fail_with_reason_others_run(bench, monkeypatch, tmp_path):
    """A section that hangs (with a worker process of its own, as FFCV's writer leaves them) is killed after
    --section-timeout with its whole process group; one that dies is reported with its exit code."""
    import types

    pidfile = tmp_path / "worker.pid"

    def hang(ctx):
        w = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        pidfile.write_text(str(w.pid))
        time.sleep(600)

    def die(ctx):
        os._exit(3)

    for name, run in (("prep", hang), ("loader", die), ("model", lambda ctx: {"model/x": 1.0})):
        m = types.ModuleType(f"sections.{name}")
        m.run = run
        monkeypatch.setitem(sys.modules, f"sections.{name}", m)
    out = tmp_path / "r.json"
    t0 = time.monotonic()
    assert bench.main(["--section", "prep,loader,model", "--section-timeout", "3", "--json", str(out)]) == 1
    assert time.monotonic() - t0 < 120
    res = json.loads(out.read_text())
    assert res["failed"] == {"prep": "timeout after 3 s", "loader": "the section's process died (exit code 3)"}
    assert res["metrics"] == {"model/x": 1.0}
    pid = int(pidfile.read_text())
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
             timeout=10)
    with pytest.raises(SystemExit):
        bench.parse_args(["--section-timeout", "0"])


@pytest.mark.slow
def test_bench_prep_and_loader_finish_on_a_tree_with_unreadable_files(bad_tree, tmp_path):
    """The real sections: FFCV's writer gets the accepted list (it hangs on a bad file otherwise) and the
    torchvision loader reads it; both finish with numbers, nothing failed."""
    src, out, _ = bad_tree
    env = dict(os.environ, FASTVIT_BENCH_SCRATCH=str(tmp_path / "scratch"))
    bench = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"
    r = subprocess.run([sys.executable, str(bench), "--quick", "--section", "prep,loader", "--src", str(src),
                        "--data", str(out), "--workers", "2", "--section-timeout", "540", "--json",
                        str(tmp_path / "r.json")], capture_output=True, text=True, env=env, timeout=1200)
    res = json.loads((tmp_path / "r.json").read_text())
    assert r.returncode == 0 and res["failed"] == {}, r.stdout[-3000:] + r.stderr[-3000:]
    assert res["metrics"]["prep/ffcv_writer_images_per_s@256"] > 0
    assert res["metrics"]["loader/torchvision_images_per_s@64"] > 0
