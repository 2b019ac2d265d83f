"""fastvit-train --dry-run: the plan printed, nothing trained, nothing written; --assume-speed for a
machine you are not on; the per-stage data-bound verdict follows from the rates it is given."""
from __future__ import annotations

import json

import pytest

from fastvit.train.cli import main

TINY = ["--preset", "test", "--device", "cpu", "--backend", "dali", "--no-progress"]


def _assume(tmp_path, img_s=8000.0, **more):
    f = tmp_path / "speed.json"
    f.write_text(json.dumps({"device": "a test GPU", "cores": 16, "memory_gb": 80, "source": "test",
                             "points": [{"model": "vit_small_plain", "class_token": True, "head": "token",
                                         "res": 224, "keep": 1.0, "img_s": img_s}], **more}))
    return f


def _no_training(monkeypatch):
    import fastvit.train.loop as L

    monkeypatch.setattr(L, "train", lambda *a, **k: pytest.fail("a run was started"))


def test_dry_run_assumed_trains_nothing_and_writes_nothing(tiny_prepped, tmp_path, monkeypatch, capsys):
    import fastvit.train.setup as setup

    _no_training(monkeypatch)
    monkeypatch.setattr(setup, "build_parts", lambda *a, **k: pytest.fail("a model was built"))
    out = tmp_path / "run"
    rc = main(["--data", str(tiny_prepped), "--out", str(out), "--hours", "24", "--dry-run",
               "--assume-speed", str(_assume(tmp_path)), "--preset", "gpu", "--final-res", "64",
               "--curriculum", "32:0.5,64:0.5", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and not out.exists()
    assert "dry run: nothing is trained and nothing is written" in text
    assert "assumed speed" in text and "a test GPU" in text and "backend: gpu_resident" in text
    assert "total:" in text and "epochs" in text
    rows = [line for line in text.splitlines() if line.strip().startswith(("1 ", "2 ", "3 "))]
    assert rows and all("resident" in r or "feed" in r or "no feed estimate" in r for r in rows)


def test_dry_run_here_probes_but_leaves_out_untouched(tiny_prepped, tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["--data", str(tiny_prepped), "--out", str(out), "--minutes", "5", "--dry-run", *TINY])
    text = capsys.readouterr().out
    assert rc == 0 and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert "probing" in text or "measured here" in text
    assert "total:" in text


def test_assume_speed_scales_by_flops_and_reads_bench_json(tmp_path):
    from fastvit.models import model_config
    from fastvit.models.vit import train_flops
    from fastvit.train.speeds import read_assumed

    a = read_assumed(_assume(tmp_path, img_s=1000.0))
    ref = train_flops(model_config("vit_small_plain", class_token=True, head="token"), 224, 1.0)
    assert a.img_s(ref, 224, 1.0) == pytest.approx(1000.0)
    assert a.img_s(2 * ref, 224, 1.0) == pytest.approx(500.0)      # twice the FLOPs: half the images/s
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"machine": {"gpu": "GPU X", "cores": 8},
                                 "metrics": {"model/fastvit_local_tflops@128,keep1.0": 10.0,
                                             "model/fastvit_local_tflops@224,keep1.0": 20.0,
                                             "model/fastvit_local_img_s@224,keep1.0": 99.0}}))
    b = read_assumed(bench)
    assert b.device == "GPU X" and b.cores == 8 and len(b.points) == 2
    assert b.img_s(1e9, 224, 1.0) == pytest.approx(20e12 / 1e9)
    assert b.img_s(1e9, 112, 1.0) == pytest.approx(10e12 / 1e9)     # the nearest resolution's rate


@pytest.mark.parametrize("argv, words", [
    (["--assume-speed", "x.yaml"], "--assume-speed needs --dry-run"),
    (["--dry-run", "--assume-speed", "/nonexistent/x.yaml"], "--assume-speed /nonexistent/x.yaml"),
])
def test_bad_dry_run_input_is_one_line(tiny_prepped, tmp_path, capsys, argv, words):
    rc = main(["--data", str(tiny_prepped), "--out", str(tmp_path / "r"), "--hours", "1", *argv, *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and words in err[0]


def test_a_malformed_speed_table_is_one_line(tiny_prepped, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"points": [{"res": 224, "img_s": 5}]}))          # no model
    rc = main(["--data", str(tiny_prepped), "--hours", "1", "--dry-run", "--assume-speed", str(bad), *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "point 1" in err[0]


def test_data_bound_verdict_follows_from_the_rates(monkeypatch):
    """Per stage: data-bound exactly when (cores - 1) x the per-core decode rate is below the step rate;
    gpu_resident: the shard's fit in the GPU share."""
    import fastvit.data.feed as feed
    from fastvit.stage import Stage
    from fastvit.train.run_planner import stage_rows
    from fastvit.train.planner import plan_budget

    monkeypatch.setattr(feed, "load_decode_table", lambda path=None: {"ffcv": {64: 1000.0, 128: 250.0}})
    stages = [Stage(res=64, keep=0.5, batch_size=8, f0=0.0, f1=0.5), Stage(res=128, keep=1.0, batch_size=8, f0=0.5, f1=1.0)]
    plan = plan_budget(stages, speeds={stages[0].shape: 10_000.0, stages[1].shape: 2_000.0}, budget_s=100.0)
    rows = stage_rows(plan, n_train=1000, backend="ffcv", cores=9, gpu_bytes=None)
    assert [r["feed_img_s"] for r in rows] == [8000.0, 2000.0]
    assert [r["data_bound"] for r in rows] == [True, False]            # 8,000 < 10,000; 2,000 >= 2,000
    assert "data-bound" in rows[0]["note"] and "8,000" in rows[0]["note"]
    res = stage_rows(plan, n_train=1000, backend="gpu_resident", cores=9, gpu_bytes=3 * 64 * 64 * 1000 * 1.5)
    assert [r["data_bound"] for r in res] == [False, None]            # 64 px fits the share, 128 px does not
    assert "does not fit resident" in res[1]["note"]


def test_a_run_says_which_stages_its_loader_cannot_feed(tiny_prepped, tmp_path, monkeypatch, capsys):
    """The real run's plan, like the dry run's, names a data-bound stage (here: a decode table that
    says this machine decodes one image a second)."""
    import fastvit.data.feed as feed

    monkeypatch.setattr(feed, "load_decode_table", lambda path=None: {"dali": {32: 1.0, 64: 1.0}})
    # 0.5 min: set-up (compile + probe) took 16 s of a 12 s budget on the 2-core machine at load 7
    rc = main(["--data", str(tiny_prepped), "--out", str(tmp_path / "r"), "--minutes", "0.5", "--evals", "0", *TINY])
    err = capsys.readouterr().err
    assert rc == 0, err
    bound = [line for line in err.splitlines() if "data-bound: dali" in line]
    assert bound and all(line.startswith("[fastvit-train] stage ") for line in bound)
