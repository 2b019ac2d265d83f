"""DataSource: device, backend and container resolved once (DataSource.resolve), then trusted.

Set-up makes the run's one source; the curriculum loader, the val loader, make_loader and the evaluator
take it as it is: with the resolving functions made to fail, they still build and serve every batch. The
old string signatures resolve through the same function, once per loader, and give the same batches.
A fastvit-train run calls DataSource.resolve exactly once, and every readability check and auto choice
happens inside that call."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

import fastvit.data.backend_resident as R
import fastvit.data.backends as B
import fastvit.data.source as S
from fastvit.data import CurriculumLoader, DataError, DataSource, Stage, make_loader, make_val_loader, open_dataset

STAGES = [Stage(res=32, batch_size=8, steps=5), Stage(res=64, batch_size=8, steps=6)]
READS = [("train", None), ("val", 64)]


@pytest.fixture(scope="module")
def ds(tiny_prepped):
    return open_dataset(tiny_prepped)


@pytest.fixture(autouse=True)
def _reference_patch_embed(monkeypatch):
    """The PyTorch reference embedding for the training run (conftest's TRITON_INTERPRET=1 is for the
    kernel tests; the interpreter makes each CPU step take seconds)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _labels(batches) -> list[list[int]]:
    return [b[1].tolist() for b in batches]


class _Calls:
    """Counts DataSource.resolve and the resolving functions, noting each call made outside resolve."""

    def __init__(self, monkeypatch):
        self.resolves, self.outside, self._depth = 0, [], 0
        real = DataSource.resolve.__func__

        def resolve(cls, *a, **k):
            self.resolves += 1
            self._depth += 1
            try:
                return real(cls, *a, **k)
            finally:
                self._depth -= 1

        monkeypatch.setattr(DataSource, "resolve", classmethod(resolve))
        for mod in (S, B):
            for name in ("choose_auto", "check_readable", "check_runnable", "container_for", "resolve_device"):
                if hasattr(mod, name):
                    monkeypatch.setattr(mod, name, self._watch(name, getattr(mod, name)))

    def _watch(self, name, fn):
        def watched(*a, **k):
            if not self._depth:
                self.outside.append(name)
            return fn(*a, **k)
        return watched


def _refuse_resolving(monkeypatch):
    """Every resolving function fails: what still works trusts its source."""
    def refuse(*a, **k):
        raise AssertionError("resolved again")

    monkeypatch.setattr(DataSource, "resolve", classmethod(refuse))
    for mod in (S, B):
        for name in ("choose_auto", "check_readable", "check_runnable", "container_for", "resolve_device"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, refuse)


# ------------------------------------------------------------------------------------------------ the value

def test_auto_and_a_device_string_are_refused(ds):
    dev = torch.device("cpu")
    with pytest.raises(DataError, match="concrete backend"):
        DataSource(ds, dev, "auto", ())
    with pytest.raises(DataError, match="concrete backend"):
        DataSource(ds, dev, "nope", ())
    with pytest.raises(DataError, match="torch.device"):
        DataSource(ds, "cpu", "dali", ())


def test_resolve_names_a_concrete_backend_and_each_splits_container(ds):
    src = DataSource.resolve(ds, "auto", "cpu", READS)
    assert src.backend in B.BACKENDS and src.backend == B.choose_auto(ds, "cpu", READS)[0]
    assert src.why.startswith(f"backend auto -> {src.backend} on cpu") and src.device == torch.device("cpu")
    named = DataSource.resolve(ds, "gpu_resident", "cpu", READS)
    assert named.why == "" and [named.container(s) for s in ("train", "val")] == ["ffcv", "ffcv"]
    assert DataSource.resolve(ds, "torchvision", "cpu", READS).container("train") is None
    with pytest.raises(DataError, match="split 'test'"):
        named.container("test")
    # the streaming backend of a resident stage that does not fit: resolved with the curriculum's read
    stream, why_not = named.streaming_source("train")
    assert stream.backend == B.choose_auto(ds, "cpu", [("train", None)], order=B.STREAMING)[0] and not why_not
    assert named.streaming_source("val")[0] is None                          # val is read at one res only
    with pytest.raises(dataclasses.FrozenInstanceError):
        named.backend = "dali"


def test_resolve_checks_a_named_backend_before_any_compute(ds):
    with pytest.raises(DataError, match="unknown backend"):
        DataSource.resolve(ds, "nope", "tpu", READS)                           # the name before the device
    with pytest.raises(DataError, match="no 'validation' split"):
        DataSource.resolve(ds, "dali", "cpu", [("train", None), ("validation", 64)])
    with pytest.raises(DataError, match="no loader backend can read"):
        DataSource.resolve(ds, "auto", "cpu", [("validation", 64)])


def test_a_source_with_other_backend_or_device_arguments_is_refused(ds):
    src = DataSource.resolve(ds, "dali", "cpu", READS)
    with pytest.raises(DataError, match="the source carries both"):
        make_loader(src, res=32, batch_size=8, backend="ffcv")
    with pytest.raises(DataError, match="the source carries both"):
        CurriculumLoader(src, STAGES, device="meta")


# ------------------------------------------------------------------------------------------------ trusted

def test_loaders_and_evaluator_given_a_source_resolve_nothing(ds, monkeypatch):
    from fastvit.train.evaluate import Evaluator
    from fastvit.train.setup import RunEnv

    src = DataSource.resolve(ds, "dali", "cpu", READS)
    with CurriculumLoader(ds, STAGES, backend="dali", device="cpu", seed=0, workers=1) as cl:
        want_train = _labels(cl)
    with make_val_loader(ds, res=64, batch_size=8, backend="dali", device="cpu", workers=1) as v:
        want_val = _labels(v)
    _refuse_resolving(monkeypatch)
    with CurriculumLoader(src, STAGES, seed=0, workers=1) as cl:
        assert _labels(cl) == want_train and cl.backend == "dali" and cl.source is src
    with make_val_loader(src, res=64, batch_size=8, workers=1) as v:
        assert _labels(v) == want_val
    with make_loader(src, "train", res=32, batch_size=8, seed=3, workers=1) as it:
        assert it.next_batch()[0].shape == (8, 3, 32, 32)

    class Mean(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3, ds.num_classes)

        def forward(self, x):                                                  # (B,3,r,r) uint8
            return self.head(x.float().mean((2, 3)))                           # (B,C)

    env = RunEnv(source=src, final_res=64, amp=False, compile=False)
    ev = Evaluator(env, batch_size=8, workers=1, loader_kwargs={})
    try:
        r = ev(Mean(), None, None)
    finally:
        ev.close()
    assert r["val_images"] == ds.count("val")


def test_resident_stage_that_does_not_fit_streams_from_the_resolved_source(ds, monkeypatch):
    """gpu_resident: the streaming backend is fixed by the source, not chosen again by the loader."""
    src = DataSource.resolve(ds, "gpu_resident", "cpu", READS)
    stream = src.streaming_source("train")[0]
    a, b = R.estimate_bytes(ds, "train", 32), R.estimate_bytes(ds, "train", 64)
    monkeypatch.setattr(R, "memory_cap", lambda device, share: a + b - 1)     # each fits alone, not both
    _refuse_resolving(monkeypatch)
    with CurriculumLoader(src, STAGES, seed=0, workers=1) as cl:
        assert [s.backend for s in cl.spans] == ["gpu_resident", stream.backend]
        assert len(list(cl)) == sum(s.steps for s in STAGES)


# ------------------------------------------------------------------------------------------------ strings

def test_the_string_path_resolves_once_per_loader_through_resolve(ds, monkeypatch):
    calls = _Calls(monkeypatch)
    with CurriculumLoader(ds, STAGES, backend="auto", device="cpu", seed=0, workers=1) as cl:
        n = len(list(cl))
    assert n == 11 and calls.resolves == 1
    with make_loader(ds, "train", res=32, batch_size=8, backend="dali", device="cpu", workers=1) as it:
        it.next_batch()
    with make_val_loader(ds, res=64, batch_size=8, backend="auto", device="cpu", workers=1) as it:
        it.next_batch()
    assert calls.resolves == 3 and calls.outside == [], calls.outside


def test_a_training_run_resolves_its_source_once(tiny_prepped, tmp_path, monkeypatch, capsys):
    """fastvit-train (backend auto, periodic and final evaluations): one DataSource.resolve, and no
    auto choice, readability check or container look-up outside it."""
    from fastvit.train.cli import main

    calls = _Calls(monkeypatch)
    made = []
    real_open = CurriculumLoader.__init__

    def opened(self, data, *a, **k):
        made.append(type(data).__name__)
        real_open(self, data, *a, **k)

    monkeypatch.setattr(CurriculumLoader, "__init__", opened)
    rc = main(["--data", str(tiny_prepped), "--out", str(tmp_path / "run"), "--epochs", "1", "--evals", "1",
               "--preset", "test", "--device", "cpu", "--backend", "auto", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "backend auto -> " in capsys.readouterr().err                    # set-up says its choice
    assert calls.resolves == 1 and made and set(made) == {"DataSource"} and calls.outside == [], calls.outside
