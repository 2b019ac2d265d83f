"""The built-in synthetic demo dataset: layout, determinism, image properties, resume."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastvit.data_prep.demo import demo_classes, make_demo_dataset


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.JPEG"))}


def test_layout_sizes_and_modes(tiny_src):
    wnids = sorted(p.name for p in (tiny_src / "train").iterdir())
    assert wnids == [w for w, _, _ in demo_classes(4)]
    assert sorted(p.name for p in (tiny_src / "val").iterdir()) == wnids
    files = sorted(tiny_src.rglob("*.JPEG"))
    assert len(files) == 4 * (16 + 6)
    sizes, modes = set(), set()
    for f in files:
        with Image.open(f) as im:
            assert im.format == "JPEG"
            assert 48 <= min(im.size) and max(im.size) <= 160
            sizes.add(im.size)
            modes.add(im.mode)
    assert len(sizes) > 20  # varied sizes and aspect ratios
    assert modes == {"RGB", "L"}  # a few grayscale images among colour ones


def test_deterministic_and_resumes(tmp_path):
    a = make_demo_dataset(tmp_path / "a", num_classes=2, train_per_class=3, val_per_class=1, seed=1,
                          min_side=40, max_side=80, grayscale_every=0, workers=1)
    b = make_demo_dataset(tmp_path / "b", num_classes=2, train_per_class=3, val_per_class=1, seed=1,
                          min_side=40, max_side=80, grayscale_every=0, workers=2)
    assert _digest(a) == _digest(b)
    # A run killed halfway leaves some files missing and a stray temporary: the rerun completes it.
    victim = sorted(a.rglob("*.JPEG"))[0]
    victim.unlink()
    (a / ".demo-complete.json").unlink()
    (victim.parent / (victim.name + ".tmp-12345")).write_bytes(b"partial")
    make_demo_dataset(a, num_classes=2, train_per_class=3, val_per_class=1, seed=1,
                      min_side=40, max_side=80, grayscale_every=0, workers=1)
    assert _digest(a) == _digest(b)
    assert not list(a.rglob("*.tmp-*"))
    c = make_demo_dataset(tmp_path / "c", num_classes=2, train_per_class=3, val_per_class=1, seed=2,
                          min_side=40, max_side=80, grayscale_every=0, workers=1)
    assert _digest(c) != _digest(a)


def test_classes_differ_in_content(tiny_src):
    """Not a single-pixel giveaway, but classes are not identical noise either: mean images differ."""
    means = []
    for wnid_dir in sorted((tiny_src / "train").iterdir()):
        arrs = [np.asarray(Image.open(f).convert("L").resize((32, 32)), dtype=np.float32)
                for f in sorted(wnid_dir.glob("*.JPEG"))]
        means.append(np.mean(arrs, axis=0))
    assert all(np.abs(means[0] - m).mean() > 1.0 for m in means[1:])


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path, num_classes=11)
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path, min_side=100, max_side=50)
