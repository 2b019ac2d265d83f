"""Real ImageNet photographs (../shared/data; skipped when absent): the flat imagenet-sample folder as a
source, and an Imagenette subset (symlinked ImageFolder tree); outputs verify through FFCV and DALI."""
from __future__ import annotations

import json
import os

import pytest

from fastvit.data_prep import prep_dataset
from fastvit.data_prep.verify import verify_dataset

pytestmark = pytest.mark.realdata


def test_imagenet_sample_flat(shared_data, tmp_path):
    src = shared_data / "imagenet-sample"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    n = sum(1 for p in src.iterdir() if p.suffix == ".JPEG")
    m = prep_dataset(src, tmp_path / "out", resolutions=[64, 128], splits=("train",), workers=2, progress=False)
    s = m["splits"]["train"]
    assert s["layout"] == "wnid_prefix" and s["count"] == n and s["skipped"] == []
    assert len(m["classes"]) == len({p.name.split("_")[0] for p in src.iterdir()})
    assert s["images"]["128"]["min_short_side"] <= 146 and s["images"]["128"]["max_short_side"] == 146
    rep = verify_dataset(tmp_path / "out", samples=32)
    assert rep.ok, rep.problems


def test_imagenette_subset(shared_data, tmp_path):
    src = shared_data / "imagenette2-224"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    tree = tmp_path / "tree"
    for split, per_class in (("train", 4), ("val", 2)):
        for cls in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            (tree / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:per_class]:
                os.symlink(f, tree / split / cls.name / f.name)
    m = prep_dataset(tree, tmp_path / "out", resolutions=[64, 224], workers=2, progress=False)
    assert m["classes"] == sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    assert (m["splits"]["train"]["count"], m["splits"]["val"]["count"]) == (40, 20)
    # 224x224 sources: stored as is at 224 (256 would be an upscale), 73x73 at 64
    assert m["splits"]["val"]["images"]["224"]["max_long_side"] == 224
    assert m["splits"]["val"]["images"]["64"]["max_long_side"] == 73
    rep = verify_dataset(tmp_path / "out", samples=8)
    assert rep.ok, rep.problems
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["src"] == str(tree.resolve())
