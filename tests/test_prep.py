"""fastvit-prep on the session's tiny demo tree: every written file read back through a stock FFCV Loader
and a stock DALI webdataset pipeline (CPU), compared with the source images."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from fastvit.data_prep import stored_size
from fastvit.data_prep.codec import transcode
from fastvit.containers import BetonFile, read_index
from fastvit.data_prep.verify import decode_with_dali, decode_with_ffcv, verify_dataset

RATIO = 256 / 224


def source_items(src: Path, split: str) -> list[tuple[Path, int]]:
    """(path, label) in the order fastvit-prep stores them: classes sorted, files sorted."""
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    out = []
    for c in sorted(p.name for p in (src / split).iterdir() if p.is_dir()):
        out += [(f, classes.index(c)) for f in sorted((src / split / c).iterdir()) if f.suffix == ".JPEG"]
    return out


def upright_rgb(path: Path) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(path)).convert("RGB")


@pytest.mark.parametrize("w,h,r,expect", [
    (500, 375, 224, (341, 256)),   # landscape: shorter side -> round(224 * 256/224) = 256
    (375, 500, 64, (73, 97)),      # portrait at 64: 73 = round(64 * 8/7)
    (200, 150, 224, (200, 150)),   # smaller than the target: never upscaled
    (256, 256, 224, (256, 256)),   # exactly the target
    (1000, 100, 64, (730, 73)),    # extreme aspect kept
])
def test_stored_size_rule(w, h, r, expect):
    assert stored_size(w, h, r, RATIO) == expect


def test_beton_layout_matches_ffcv_types():
    """Our .beton writer mirrors FFCV's dtypes; a change in FFCV must fail here, not at load time."""
    from ffcv import types
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import MIN_PAGE_SIZE

    from fastvit.data_prep import beton

    assert beton.HEADER_TYPE == types.HeaderType
    assert beton.ALLOC_TABLE_TYPE == types.ALLOC_TABLE_TYPE
    assert beton.FIELD_DESC_TYPE == types.FieldDescType
    assert beton.FORMAT_VERSION == types.CURRENT_VERSION
    assert beton.MIN_PAGE_SIZE == MIN_PAGE_SIZE
    assert beton.METADATA_TYPE == types.get_metadata_type([RGBImageField(), IntField()])
    ids = {v: k for k, v in types.TYPE_ID_HANDLER.items()}
    assert (beton.TYPE_ID_RGB, beton.TYPE_ID_INT) == (ids[RGBImageField], ids[IntField])


def test_manifest_layout(tiny_prepped, tiny_src):
    m = json.loads((tiny_prepped / "manifest.json").read_text())
    assert m["version"] == 1
    assert m["classes"] == sorted(p.name for p in (tiny_src / "train").iterdir() if p.is_dir())
    assert m["resolutions"] == [32, 64]
    assert m["stored_size"]["short_side"] == {"32": 37, "64": 73}
    assert m["encode"]["quality"] == 90
    for split in ("train", "val"):
        s = m["splits"][split]
        assert s["count"] == len(source_items(tiny_src, split)) and s["skipped"] == []
        for r in ("32", "64"):
            assert s["ffcv"][r] == f"ffcv/{split}_{r}.beton"
            assert all(t.startswith(f"dali/{split}_{r}_") and t.endswith(".tar") for t in s["dali"][r]["tars"])
            assert [t[:-4] + ".idx" for t in s["dali"][r]["tars"]] == s["dali"][r]["index"]
            for rel in [s["ffcv"][r]] + s["dali"][r]["tars"] + s["dali"][r]["index"]:
                assert (tiny_prepped / rel).is_file() and len(m["files"][rel]["sha256"]) == 64
    from fastvit.data import open_dataset  # the loader side accepts it

    ds = open_dataset(tiny_prepped)
    assert ds.count("train") == m["splits"]["train"]["count"]


def test_every_file_reads_back_through_ffcv_and_dali(tiny_prepped, tiny_src):
    m = json.loads((tiny_prepped / "manifest.json").read_text())
    for split in ("train", "val"):
        items = source_items(tiny_src, split)
        labels = np.array([lab for _, lab in items])
        for r in (32, 64):
            expect = [stored_size(*upright_rgb(p).size, r, RATIO) for p, _ in items]  # (w, h)
            beton = tiny_prepped / m["splits"][split]["ffcv"][str(r)]
            meta, blobs = BetonFile(beton).head(len(items))
            assert [(int(x["f0"]["width"]), int(x["f0"]["height"])) for x in meta] == expect
            ff_images, ff_labels = decode_with_ffcv(beton, len(items), r)  # stock Loader + decoders
            assert ff_images.shape == (len(items), r, r, 3) and ff_images.dtype == np.uint8
            np.testing.assert_array_equal(ff_labels, labels)

            d = m["splits"][split]["dali"][str(r)]
            tars, idxs = [tiny_prepped / t for t in d["tars"]], [tiny_prepped / i for i in d["index"]]
            dl_images, dl_labels, raw = decode_with_dali(tars, idxs, len(items))
            np.testing.assert_array_equal(dl_labels, labels)
            assert [im.shape for im in dl_images] == [(h, w, 3) for w, h in expect]
            assert raw == blobs, "FFCV and DALI must hold the very same JPEG bytes"

            for k, ((p, _), im) in enumerate(zip(items, dl_images)):
                # error vs a Lanczos resize of the source, against what Lanczos + JPEG q90 itself gets
                ref_im = upright_rgb(p).resize(expect[k], Image.LANCZOS)
                ref = np.asarray(ref_im, dtype=np.float32)
                buf = io.BytesIO()
                ref_im.save(buf, "JPEG", quality=90)
                ideal = np.abs(np.asarray(Image.open(buf), np.float32) - ref).mean()
                err = np.abs(im.astype(np.float32) - ref).mean()
                assert err < 1.5 * ideal + 1.0, f"{p} @ {r} does not look like its source ({err:.1f} vs {ideal:.1f})"
                # FFCV's center crop of the same image: compare with a crop of the decoded stored JPEG
                s = min(im.shape[:2])
                c = int(224 / 256 * s)
                y0, x0 = (im.shape[0] - c) // 2, (im.shape[1] - c) // 2
                crop = Image.fromarray(im[y0:y0 + c, x0:x0 + c]).resize((r, r), Image.BILINEAR)
                assert np.abs(ff_images[k].astype(np.float32) - np.asarray(crop, np.float32)).mean() < 10


def test_index_is_what_wds2idx_writes(tiny_prepped, tmp_path):
    wds2idx = Path(sys.executable).parent / "wds2idx"
    if not wds2idx.exists():
        pytest.skip("DALI's wds2idx is not installed")
    m = json.loads((tiny_prepped / "manifest.json").read_text())
    d = m["splits"]["train"]["dali"]["64"]
    tar, idx = tiny_prepped / d["tars"][0], tiny_prepped / d["index"][0]
    subprocess.run([str(wds2idx), str(tar), str(tmp_path / "x.idx")], check=True, capture_output=True)
    assert (tmp_path / "x.idx").read_text() == idx.read_text()
    assert len(read_index(idx)) == d["samples"][0]


def test_same_bytes_as_direct_transcode(tiny_prepped, tiny_src):
    """Deterministic: the stored JPEG of an image is exactly transcode(source) at that size."""
    m = json.loads((tiny_prepped / "manifest.json").read_text())
    items = source_items(tiny_src, "val")
    _, blobs = BetonFile(tiny_prepped / m["splits"]["val"]["ffcv"]["64"]).head(3)
    for (p, _), blob in zip(items[:3], blobs):
        assert transcode(p.read_bytes(), [32, 64], RATIO, 90).outputs[1][2] == blob


def test_verify_ok_then_catches_flipped_byte(tiny_prepped, tmp_path):
    from fastvit.data_prep.cli import main

    out = tmp_path / "copy"
    shutil.copytree(tiny_prepped, out)
    rep = verify_dataset(out)
    assert rep.ok, rep.problems
    assert rep.decoded and all(v > 0 for v in rep.decoded.values())
    assert main(["--verify", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    for rel in (m["splits"]["val"]["dali"]["32"]["tars"][0], m["splits"]["train"]["ffcv"]["64"]):
        p = out / rel
        data = bytearray(p.read_bytes())
        data[len(data) // 3] ^= 0x01
        p.write_bytes(bytes(data))
        rep = verify_dataset(out, decode=False)
        assert not rep.ok and any(rel in prob and "checksum" in prob for prob in rep.problems)
        assert main(["--verify", str(out)]) == 1
        data[len(data) // 3] ^= 0x01
        p.write_bytes(bytes(data))
    assert verify_dataset(out, decode=False).ok
