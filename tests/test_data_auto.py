"""Backend "auto" (the default) and the GPU-resident loader's memory cap, on CPU.

auto: the best installed backend for the device that can read the data, said in one line; one-line
DataError before anything is built when none can. gpu_resident: shards alive together (the training
stage's and the next one filling in the background) fit a share of the device's memory, else that stage
streams with the best streaming backend (planned), and a shard that no longer fits when its turn comes
streams too (at run time)."""
from __future__ import annotations

import logging

import pytest

import fastvit.data.backend_resident as R
import fastvit.data.backends as B
from fastvit.data import CurriculumLoader, DataError, Stage, make_loader, open_dataset

STAGES = [Stage(res=32, batch_size=8, steps=5), Stage(res=64, batch_size=8, steps=6)]


@pytest.fixture(scope="module")
def ds(tiny_prepped):
    return open_dataset(tiny_prepped)


def _without(monkeypatch, *missing):
    real = B._importable
    monkeypatch.setattr(B, "_importable", lambda m: m not in missing and real(m))


READS = [("train", None), ("val", 64)]


def test_auto_prefers_dali_then_ffcv_then_torchvision_on_cpu(ds, monkeypatch):
    assert B.choose_auto(ds, "cpu", READS) == ("dali", "backend auto -> dali on cpu")
    _without(monkeypatch, "nvidia.dali")
    name, why = B.choose_auto(ds, "cpu", READS)
    assert name == "ffcv" and why.startswith("backend auto -> ffcv on cpu; not dali: dali: nvidia.dali not installed")
    _without(monkeypatch, "nvidia.dali", "ffcv")
    assert B.choose_auto(ds, "cpu", READS)[0] == "torchvision"      # the source tree prep read


def test_auto_order_on_cuda_is_dali_then_gpu_resident():
    assert B.AUTO_ORDER["cuda"][:2] == ("dali", "gpu_resident")


def test_nothing_can_read_is_one_line_naming_each_candidate(ds, monkeypatch):
    _without(monkeypatch, "nvidia.dali", "ffcv", "torchvision")
    with pytest.raises(DataError) as e:
        B.choose_auto(ds, "cpu", READS)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("no loader backend can read")
    assert all(f"{b}: " in msg for b in ("dali", "ffcv", "torchvision"))


def test_train_with_no_readable_backend_fails_before_any_compute(tiny_prepped, tmp_path, monkeypatch, capsys):
    import fastvit.train.loop as L   # imported before the patch: the loop's own name is patched
    from fastvit.train.cli import main

    _without(monkeypatch, "nvidia.dali", "ffcv", "torchvision")
    monkeypatch.setattr(L, "build_parts", lambda *a, **k: pytest.fail("a model was built"))
    rc = main(["--data", str(tiny_prepped), "--out", str(tmp_path / "r"), "--epochs", "1", "--preset", "test",
               "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no loader backend can read" in err[0]


def test_make_loader_auto(ds):
    with make_loader(ds, "train", res=32, batch_size=8, backend="auto", device="cpu", workers=1) as it:
        images, labels = it.next_batch()
        assert it.backend == "dali" and images.shape == (8, 3, 32, 32)


def _nbytes(ds, res):
    return R.estimate_bytes(ds, "train", res)


def test_resident_stage_that_does_not_fit_with_the_previous_one_streams(ds, monkeypatch, caplog):
    a, b = _nbytes(ds, 32), _nbytes(ds, 64)
    monkeypatch.setattr(R, "memory_cap", lambda device, share: a + b - 1)   # each fits alone, not both
    with caplog.at_level(logging.WARNING, logger="fastvit.data"):
        with CurriculumLoader(ds, STAGES, backend="gpu_resident", device="cpu", seed=0, workers=1) as cl:
            assert [s.backend for s in cl.spans] == ["gpu_resident", "dali"]
            got = [(images.shape[-1], stage.res) for images, _, stage in cl]
    assert len(got) == 11 and all(a == b for a, b in got)
    lines = [r.getMessage() for r in caplog.records if "does not fit" in r.getMessage()]
    assert len(lines) == 1 and "@64 px" in lines[0] and "with @32 px still held" in lines[0] and "dali" in lines[0]


def test_resident_shard_that_no_longer_fits_at_its_turn_streams(ds, monkeypatch, caplog):
    monkeypatch.setattr(R, "memory_budget", lambda device, share: 0)      # memory taken since the plan
    with caplog.at_level(logging.WARNING, logger="fastvit.data"):
        with CurriculumLoader(ds, STAGES[:1], backend="gpu_resident", device="cpu", seed=0, workers=1) as cl:
            assert cl.spans[0].backend == "gpu_resident"                  # planned resident
            batches = [next(cl)]
            assert type(cl._current).__name__ == "DALILoader"
            batches += list(cl)
    assert len(batches) == 5
    assert any("streaming it with dali" in r.getMessage() for r in caplog.records)


def test_live_shards_count_against_the_cap(ds):
    dev = __import__("torch").device("cpu")
    before = R.resident_bytes(dev)
    shard = R.decode_shard(ds, "train", 32, dev, share=1.0)
    assert R.resident_bytes(dev) - before == shard.data.numel()
    del shard
    import gc

    gc.collect()
    assert R.resident_bytes(dev) == before


def test_resident_needs_no_streaming_backend_while_everything_fits(ds, monkeypatch):
    _without(monkeypatch, "nvidia.dali", "ffcv")
    monkeypatch.setattr(B, "check_readable", lambda *a, **k: (_ for _ in ()).throw(DataError("no source tree")))
    with CurriculumLoader(ds, STAGES, backend="gpu_resident", device="cpu", seed=0, workers=1) as cl:
        assert [s.backend for s in cl.spans] == ["gpu_resident", "gpu_resident"] and len(list(cl)) == 11
    monkeypatch.setattr(R, "memory_cap", lambda device, share: 1)
    with pytest.raises(DataError, match="does not fit .* and no loader backend can read"):
        CurriculumLoader(ds, STAGES, backend="gpu_resident", device="cpu", seed=0, workers=1)
