"""The training step's deferred NaN/inf check (the CUDA default: fused AdamW, no host sync per step),
exercised on CPU with a fused CPU AdamW: NaN steps are skipped on the device (weights, moments and step
count untouched), counted, and read every --log-every steps; NAN_LIMIT in a row still stops the run
with a checkpoint of the last good weights."""
from __future__ import annotations

import json

import pytest
import torch

from fastvit.train import checkpoint as C
from fastvit.train.cli import main

TINY = ["--preset", "test", "--device", "cpu", "--backend", "dali", "--no-progress", "--evals", "0"]


@pytest.fixture
def deferred(monkeypatch):
    """Every TrainStep of the run in deferred mode, over a fused (CPU) AdamW with the same groups."""
    from fastvit.train.step import TrainStep

    real_init, made = TrainStep.__init__, []

    def init(self, parts, cfg, env, deferred=None):
        groups = [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]}
                  for g in parts.opt.param_groups]
        parts.opt = torch.optim.AdamW(groups, fused=True)
        real_init(self, parts, cfg, env, deferred=True)
        made.append(self)

    monkeypatch.setattr(TrainStep, "__init__", init)
    return made


def _nan_after_probe(monkeypatch, bad):
    import fastvit.train.step as L

    real, calls = L.F.log_softmax, []

    def log_softmax(x, dim):
        calls.append(1)
        return real(x, dim=dim) * (float("nan") if bad(len(calls)) else 1.0)

    monkeypatch.setattr(L.F, "log_softmax", log_softmax)


def test_deferred_mode_skips_nan_steps_without_reading_each_loss(tiny_prepped, tmp_path, monkeypatch, deferred):
    polls = []
    from fastvit.train.step import TrainStep

    real_poll = TrainStep.poll
    monkeypatch.setattr(TrainStep, "poll", lambda self, loss=True: (polls.append(1) if loss else None)
                        or real_poll(self, loss))
    _nan_after_probe(monkeypatch, lambda n: 6 <= n < 11)          # 5 steps after the probe's one
    run = tmp_path / "run"
    assert main(["--data", str(tiny_prepped), "--out", str(run), "--epochs", "4", "--keep-min", "1",
                 "--curriculum", "32:1", "--log-every", "4", *TINY]) == 0
    res = json.loads((run / "results.json").read_text())
    assert deferred and deferred[0].deferred
    assert res["nan_skipped"] == 5 and res["steps"] == 16
    assert len(polls) == 4                                # loss read at steps 4, 8, 12, 16: not every step
    st, _ = C.load_latest(run)
    assert all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 4 and all(x is None or x == x for x in losses)   # interval means, never NaN


def test_deferred_mode_stops_after_nan_limit_with_last_good_weights(tiny_prepped, tmp_path, monkeypatch, capsys,
                                                                     deferred):
    _nan_after_probe(monkeypatch, lambda n: n >= 2)
    run = tmp_path / "nan"
    rc = main(["--data", str(tiny_prepped), "--out", str(run), "--epochs", "10", "--log-every", "4", *TINY])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "NaN" in err[-1] and "Traceback" not in "\n".join(err)
    st, _ = C.load_latest(run)
    assert st["nan_total"] >= 10, (err[-3:], st["step"], st["nan_total"])
    assert all(torch.isfinite(v).all() for v in st["model"].values()
                                         if v.is_floating_point())


def test_deferred_step_leaves_weights_and_optimizer_state_untouched():
    from types import SimpleNamespace

    from fastvit.stage import Stage
    from fastvit.train.schedules import AugStrength
    from fastvit.train.step import TrainStep

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    step_model = lambda x, **kw: model(x.float())                   # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    mixup = SimpleNamespace(num_classes=3)
    parts = SimpleNamespace(model=model, step_model=step_model, opt=opt, ema=None, mixup=mixup)
    env = SimpleNamespace(device=torch.device("cpu"), amp=False, cuda=False)
    cfg = SimpleNamespace(optim=SimpleNamespace(clip_grad=1.0), augment=SimpleNamespace(randaug_ops=2))
    import fastvit.train.step as L

    ts = TrainStep(parts, cfg, env, deferred=True)
    x = torch.randint(0, 256, (4, 3, 4, 4), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0])
    aug = AugStrength(mix_prob=0.0, randaug_mag=0.0, drop_path=0.0)
    real_mix = L.mix_batch
    L.mix_batch = lambda mixup, images, labels, p: (images, torch.nn.functional.one_hot(labels, 3).float())
    try:
        assert ts(x, y, Stage(4, 4), lr=1e-2, aug=aug) is None
        w = [p.detach().clone() for p in model.parameters()]
        st = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()}
        bad = x.clone()
        model[1].weight.data[0, 0] = float("inf")                     # a non-finite loss from here
        w[0][0, 0] = float("inf")
        assert ts(bad, y, Stage(4, 4), lr=1e-2, aug=aug) is None
        for p, q in zip(model.parameters(), w):
            assert torch.equal(p, q)
        for k, v in opt.state.items():
            for n, t in v.items():
                assert torch.equal(t, st[k][n]), n
        loss = ts.poll()
        assert ts.nan_total == 1 and ts.nan_run == 1 and loss is not None and loss == loss
    finally:
        L.mix_batch = real_mix
