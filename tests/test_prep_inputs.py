"""fastvit-prep on awkward inputs: bad files are skipped and listed, odd-but-valid ones come out RGB and
upright, other layouts are read, and bad arguments get one line and exit 2."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastvit.data_prep import PrepError, TooManyBadImages, prep_dataset, stored_size
from fastvit.data_prep.cli import main
from fastvit.data_prep.codec import passthrough_jpeg
from fastvit.containers import BetonFile

RATIO = 256 / 224


def gradient(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth (H, W, 3) image, distinct per seed (JPEG keeps it close, so colours can be checked)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([x / w * 200 + seed * 7, y / h * 200, (x + y) / (w + h) * 100 + seed * 13], -1)
    return np.clip(a, 0, 255).astype(np.uint8)


def jpeg_bytes(a: np.ndarray, mode: str = "RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def exif_rotated(upright: np.ndarray) -> bytes:
    """Pixels stored turned a quarter left, with EXIF orientation 6 ('rotate 90 CW to display')."""
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


# name -> (bytes maker, expected upright RGB or None, skip reason or None)
def awkward_files() -> dict:
    good = gradient(90, 60, 1)
    png = io.BytesIO()
    Image.fromarray(gradient(70, 50, 2)).save(png, "PNG")
    upright = np.zeros((60, 100, 3), np.uint8)
    upright[:, :50] = (220, 30, 30)   # left half red
    upright[:, 50:] = (30, 30, 220)   # right half blue
    gray = gradient(80, 64, 3)[..., 0]
    full = jpeg_bytes(gradient(120, 90, 4))
    return {
        "a_rgb.JPEG": (jpeg_bytes(good), good),
        "b_png_named_jpeg.JPEG": (png.getvalue(), gradient(70, 50, 2)),
        "c_cmyk.JPEG": (jpeg_bytes(gradient(64, 80, 5), "CMYK"), gradient(64, 80, 5)),
        "d_gray.JPEG": (jpeg_bytes(gray, "L"), np.repeat(gray[..., None], 3, -1)),
        "e_exif_rotated.JPEG": (exif_rotated(upright), upright),
        "f_empty.JPEG": (b"", "empty file"),
        "g_truncated.JPEG": (full[: len(full) // 2], "truncated image"),
        "h_not_an_image.JPEG": (b"this is a text file, not a JPEG\n" * 20, "not an image"),
    }


@pytest.fixture(scope="module")
def awkward_src(tmp_path_factory) -> Path:
    """train/<2 classes>/ with every awkward case in class n00000001, val/ with two plain images."""
    src = tmp_path_factory.mktemp("awkward_src")
    for name, (data, _) in awkward_files().items():
        p = src / "train" / "n00000001" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    for split, n in (("train", 3), ("val", 1)):
        for c in ("n00000001", "n00000002"):
            for i in range(n):
                p = src / split / c / f"z_{split}_{i}.JPEG"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(jpeg_bytes(gradient(50 + 10 * i, 40, 10 + i)))
    return src


@pytest.mark.parametrize("use_turbojpeg", [True, False], ids=["turbojpeg", "pillow"])
def test_awkward_inputs(awkward_src, tmp_path, use_turbojpeg):
    out = tmp_path / "out"
    with pytest.raises(TooManyBadImages) as ei:  # 3 bad of 16: far above the default 0.1%
        prep_dataset(awkward_src, out, resolutions=[32, 64], workers=1, progress=False,
                     use_turbojpeg=use_turbojpeg)
    assert "3 of 16 inputs" in str(ei.value) and ei.value.exit_code == 1
    m = json.loads((out / "manifest.json").read_text())  # written anyway, listing what was skipped
    assert m == ei.value.manifest
    files = awkward_files()
    skipped = {Path(s["path"]).name: s["reason"] for s in m["splits"]["train"]["skipped"]}
    assert skipped == {k: v for k, (_, v) in files.items() if isinstance(v, str)}
    assert m["splits"]["train"]["count"] == 8 + 6 - 3 and m["splits"]["val"]["count"] == 2

    good = [k for k, (_, v) in files.items() if not isinstance(v, str)]  # sorted: first in the beton
    meta, blobs = BetonFile(out / m["splits"]["train"]["ffcv"]["64"]).head(len(good))
    for name, x, blob in zip(good, meta, blobs):
        expect = files[name][1]
        h, w = expect.shape[:2]
        assert (int(x["f0"]["width"]), int(x["f0"]["height"])) == stored_size(w, h, 64, RATIO) == (w, h)
        im = Image.open(io.BytesIO(blob))
        assert im.mode == "RGB", name  # grayscale and CMYK sources are stored as RGB
        err = np.abs(np.asarray(im, np.float32) - expect).mean()
        assert err < 6, f"{name}: mean abs error {err:.1f} (wrong colours or orientation?)"

    # a_rgb.JPEG (60 px high) is no bigger than the 73 px stored at 64: the fast path keeps its bytes
    kept = m["splits"]["train"]["images"]["64"]["source_bytes_kept"]
    assert kept == (1 + 6 if use_turbojpeg else 0)  # a_rgb + the six small z_train images; Pillow path: none
    if use_turbojpeg:
        assert blobs[0] == passthrough_jpeg(files["a_rgb.JPEG"][0]) == files["a_rgb.JPEG"][0]

    # the same run with a permissive --max-bad succeeds and the outputs verify
    assert main(["--src", str(awkward_src), "--out", str(tmp_path / "ok"), "--res", "32", "--workers", "1",
                 "--max-bad", "0.25", "--no-progress"] + ([] if use_turbojpeg else ["--formats", "dali"])) == 0


def test_too_many_bad_exit_status(awkward_src, tmp_path, capsys):
    assert main(["--src", str(awkward_src), "--out", str(tmp_path / "o"), "--res", "32", "--formats", "dali",
                 "--workers", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastvit-prep: error: 3 of 16 inputs") and "Traceback" not in "".join(err)


def test_loc_csv_and_flat_layouts(tmp_path):
    """Kaggle layout (flat val + LOC_val_solution.csv two levels up) and a flat <wnid>_*.JPEG folder."""
    root = tmp_path / "kaggle"
    src = root / "ILSVRC" / "Data"
    wnids = ["n01440764", "n02102040"]
    rows = ["ImageId,PredictionString"]
    for i, w in enumerate(wnids):
        (src / "train" / w).mkdir(parents=True)
        (src / "train" / w / f"{w}_1.JPEG").write_bytes(jpeg_bytes(gradient(40, 30, i)))
    (src / "val").mkdir()
    for k, w in enumerate([wnids[1], wnids[0], wnids[1]]):
        (src / "val" / f"ILSVRC2012_val_{k:08d}.JPEG").write_bytes(jpeg_bytes(gradient(30, 40, k)))
        rows.append(f"ILSVRC2012_val_{k:08d},{w} 1 2 3 4 {w} 5 6 7 8")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    m = prep_dataset(src, tmp_path / "o1", resolutions=[32], formats=("dali",), workers=1, progress=False)
    assert m["classes"] == wnids and m["splits"]["val"]["layout"] == "loc_csv"
    tar = (tmp_path / "o1" / m["splits"]["val"]["dali"]["32"]["tars"][0]).read_bytes()
    # labels in val file order: wnids[1], wnids[0], wnids[1]
    labels = [int(tar[tar.index(f"{k:08d}_ILSVRC2012_val_{k:08d}.cls".encode()) + 512:][:1]) for k in range(3)]
    assert labels == [1, 0, 1]

    flat = tmp_path / "flat"
    flat.mkdir()
    for i, w in enumerate(["n03000684", "n01530575", "n03000684"]):
        (flat / f"{w}_img{i}.JPEG").write_bytes(jpeg_bytes(gradient(40, 40, i)))
    assert main(["--src", str(flat), "--out", str(tmp_path / "o2"), "--res", "32", "--workers", "1",
                 "--no-progress"]) == 0
    m = json.loads((tmp_path / "o2" / "manifest.json").read_text())
    assert m["classes"] == ["n01530575", "n03000684"] and m["splits"]["train"]["count"] == 3
    assert list(m["splits"]) == ["train"] and m["splits"]["train"]["layout"] == "wnid_prefix"


@pytest.mark.parametrize("args,needle", [
    (["--src", "{missing}", "--out", "{out}"], "no such folder"),
    (["--src", "{src}", "--out", "{out}", "--res", "0"], "--res"),
    (["--src", "{src}", "--out", "{out}", "--res", "64,abc"], "--res"),
    (["--src", "{src}", "--out", "{out}", "--formats", "ffcv,tfrecord"], "unknown format"),
    (["--src", "{empty}", "--out", "{out}"], "no train split"),
    (["--src", "{noclass}", "--out", "{out}", "--splits", "train"], "holds no images"),
    (["--src", "{src}", "--out", "{out}", "--quality", "0"], "quality"),
    (["--src", "{src}", "--out", "{out}", "--workers", "0"], "workers"),
    (["--src", "{src}", "--out", "{out}", "--splits", "train,test"], "no test split"),
    (["--out", "{out}"], "--src"),
    (["--src", "{src}", "--out", "{out}", "--bogus"], "unrecognized"),
])
def test_bad_arguments_one_line_exit_2(args, needle, awkward_src, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noclass" / "train").mkdir(parents=True)
    fill = {"missing": str(tmp_path / "nope"), "out": str(tmp_path / "out"), "src": str(awkward_src),
            "empty": str(tmp_path / "empty"), "noclass": str(tmp_path / "noclass")}
    assert main([a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastvit-prep: error:") and needle in err[0], err


def test_other_settings_refused_unless_overwrite(awkward_src, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--src", str(awkward_src), "--out", str(out), "--res", "32", "--formats", "dali", "--workers", "1",
            "--max-bad", "0.5", "--no-progress"]
    assert main(base) == 0
    before = json.loads((out / "manifest.json").read_text())["files"]
    assert main(base) == 0  # same settings: already complete, nothing rewritten
    assert json.loads((out / "manifest.json").read_text())["files"] == before
    capsys.readouterr()
    assert main(base + ["--quality", "80"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "quality 90 -> 80" in err[0]
    assert main(base + ["--quality", "80", "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["encode"]["quality"] == 80
    extra = awkward_src / "val" / "n00000002" / "zz_new.JPEG"  # the source changes under a finished OUT
    extra.write_bytes(jpeg_bytes(gradient(40, 40, 9)))
    try:
        assert main(base + ["--quality", "80"]) == 2
        assert "changed since" in capsys.readouterr().err
    finally:
        extra.unlink()
    with pytest.raises(PrepError, match="unknown option"):
        prep_dataset(awkward_src, out, [32], bogus_option=1)
    stray = tmp_path / "stray"
    (stray / "dali").mkdir(parents=True)
    (stray / "dali" / "x.tar").write_bytes(b"x")
    assert main(["--src", str(awkward_src), "--out", str(stray), "--res", "32", "--workers", "1"]) == 2
    assert (stray / "dali" / "x.tar").exists()
    assert not any(p.name.endswith(".tmp-%d" % os.getpid()) for p in out.rglob("*"))


def test_demo_flag_writes_and_preps(tmp_path, monkeypatch):
    from fastvit.data_prep import cli

    monkeypatch.setitem(cli.DEMO_SIZES, "small", {"num_classes": 2, "train_per_class": 3, "val_per_class": 2,
                                                  "min_side": 48, "max_side": 80})
    out = tmp_path / "demo"
    assert main(["--demo", "--demo-size", "small", "--out", str(out), "--res", "32", "--workers", "1",
                 "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert (m["splits"]["train"]["count"], m["splits"]["val"]["count"]) == (6, 4)
    assert m["src"] == str((out / "src").resolve())


def test_passthrough_rules():
    a = gradient(64, 48, 1)
    exif = Image.Exif()
    exif[0x010F] = "camera maker"  # harmless metadata: dropped, pixels untouched
    with_exif = jpeg_bytes(a, exif=exif.tobytes())
    kept = passthrough_jpeg(with_exif)
    assert kept is not None and len(kept) < len(with_exif) and b"Exif" not in kept
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(kept))), np.asarray(Image.open(io.BytesIO(with_exif))))
    assert passthrough_jpeg(jpeg_bytes(a, progressive=True)) is None  # slower to decode at training time
    assert passthrough_jpeg(jpeg_bytes(a[..., 0], "L")) is None       # stored as RGB, so re-encoded
    assert passthrough_jpeg(jpeg_bytes(a, "CMYK")) is None
    assert passthrough_jpeg(b"\x89PNG\r\n") is None
