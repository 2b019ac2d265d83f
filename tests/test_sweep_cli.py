"""fastvit-sweep / fastvit-forecast: a killed sweep resumes without re-running finished runs (fake
training), CSV / table / plots / forecast written, one-line errors and refusals, and one real tiny
sweep through fastvit-train."""
from __future__ import annotations

import json

import pytest

from fastvit.forecast import bnsl
from fastvit.sweep import runner
from fastvit.train.config import ConfigError
from fastvit.sweep.cli import forecast_main, sweep_main


@pytest.fixture(autouse=True)
def _reference_patch_embed(monkeypatch):
    """As in test_train_run: the Triton interpreter would make each training step take seconds on CPU."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _fake_training(monkeypatch, kill_at=None):
    """subprocess_runner replaced: writes a results.json whose error follows a known power law in the
    budget; the kill_at-th call leaves a half-written run dir and raises KeyboardInterrupt (a kill)."""
    calls = []

    def fake(job, cmd, env=None):
        calls.append((job, cmd))
        job.run_dir.mkdir(parents=True, exist_ok=True)
        if kill_at is not None and len(calls) == kill_at:
            (job.run_dir / "ckpt_000001.pt").write_bytes(b"")
            raise KeyboardInterrupt
        s = job.budget.seconds
        err = float(bnsl.bnsl(s, 0.2, 1.0, 0.3)) + 0.002 * job.seed
        (job.run_dir / "results.json").write_text(json.dumps(
            {"top1": 100 * (1 - err), "top5": 99.0, "ema_top1": None, "images_seen": int(100 * s),
             "counted_s": s, "steps": int(s)}))
        return 0

    monkeypatch.setattr(runner, "subprocess_runner", fake)
    return calls


ARGS = ["--budgets", "1m,2m,4m,8m", "--variants", "fastvit,no-pss,lr=2e-3", "--seeds", "2", "--device", "cpu",
        "--no-progress"]


def test_killed_sweep_resumes_without_rerunning_finished_runs(tiny_prepped, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sw"
    calls = _fake_training(monkeypatch, kill_at=5)
    assert sweep_main(["--data", str(tiny_prepped), "--out", str(out), *ARGS]) == 130
    first = [(c[0].variant, c[0].budget.label, c[0].seed) for c in calls]
    assert first[:4] == [("fastvit", "1m", 0), ("fastvit", "1m", 1), ("no-pss", "1m", 0), ("no-pss", "1m", 1)]
    calls2 = _fake_training(monkeypatch)
    assert sweep_main(["--data", str(tiny_prepped), "--out", str(out), *ARGS, "--forecast", "16m"]) == 0
    again = [(c[0].variant, c[0].budget.label, c[0].seed) for c in calls2]
    assert len(again) == 24 - 4 and not set(again) & set(first[:4])        # finished runs never re-run
    assert again[0] == first[4] and "--overwrite" in calls2[0][1]           # the killed run starts over
    assert all("--overwrite" not in c[1] for c in calls2[1:])
    cmd = calls2[0][1]
    assert cmd[cmd.index("--minutes") + 1] == "1" and cmd[cmd.index("--seed") + 1] == "0"
    lines = (out / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("variant,budget,budget_s,seed,top1") and len(lines) == 1 + 24
    table = (out / "table.md").read_text()
    assert "| lr=2e-3 |" in table and "(n=2)" in table
    assert "Training images seen per run" in table and "| fastvit | 6,000 | 12,000 | 24,000 | 48,000 |" in table
    for png in ("top1_vs_budget.png", "forecast.png"):
        assert (out / png).stat().st_size > 10_000
    fc = json.loads((out / "forecast.json").read_text())["variants"]["fastvit"]
    expect = 1 - float(bnsl.bnsl(960.0, 0.2, 1.0, 0.3))
    assert 100 * (1 - fc["seconds"]["y"]) == pytest.approx(100 * expect, abs=0.3)   # seed offsets: ±0.2 %
    assert fc["seconds"]["lo"] <= fc["seconds"]["y"] <= fc["seconds"]["hi"]
    assert fc["seconds"]["holdout"]["rmsle"] < 0.02
    assert "lr: 0.002" in (out / "configs" / "lr=2e-3.yaml").read_text()
    assert "keep_min: 1.0" in (out / "configs" / "no-pss.yaml").read_text()
    # a third call finds everything finished
    calls3 = _fake_training(monkeypatch)
    assert sweep_main(["--data", str(tiny_prepped), "--out", str(out), *ARGS]) == 0 and calls3 == []


def test_forecast_cli_and_refusal(tiny_prepped, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sw"
    _fake_training(monkeypatch)
    assert sweep_main(["--data", str(tiny_prepped), "--out", str(out), *ARGS]) == 0
    capsys.readouterr()
    assert forecast_main([str(out), "--at", "30m", "--variant", "fastvit"]) == 0
    assert "| fastvit | seconds | 0 |" in capsys.readouterr().out
    assert forecast_main([str(out), "--at", "24h", "--variant", "fastvit"]) == 1     # 180x the largest budget
    err = capsys.readouterr().err.strip().splitlines()
    line = "fastvit-forecast: fastvit: refusing to extrapolate 180x beyond the largest fitted budget (the limit is 100x)"
    assert err == [line, line]                                      # one line per axis: seconds, images
    assert forecast_main([str(out), "--at", "24h", "--variant", "fastvit", "--max-factor", "200"]) == 0


@pytest.mark.parametrize("argv, msg", [
    (["--budgets", "2 minutes"], "budget '2 minutes' must be"),
    (["--variants", "fastvit,no-such"], "unknown variant 'no-such'"),
    (["--variants", "lr_typo=3"], "unknown config key(s) lr_typo"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--forecast", "3ep"], "'3ep' must be a time"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--wsd-variants", "fastvit"], "--wsd-variants goes with --schedule both"),
    (["--schedule", "both", "--variants", "fastvit", "--wsd-variants", "no-pss"], "--wsd-variants no-pss: not in"),
    (["--schedule", "both", "--wsd-variants", ","], "--wsd-variants is empty"),
    (["--jobs", "2", "--device", "cuda:1"], "--device cuda:1 with --jobs: give --device cuda"),
])
def test_bad_input_is_one_line_exit_2(tiny_prepped, tmp_path, capsys, argv, msg):
    assert sweep_main(["--data", str(tiny_prepped), "--out", str(tmp_path / "s"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0] and err[0].startswith("fastvit-sweep: error:")


def test_forecast_needs_a_sweep(tmp_path, capsys):
    assert forecast_main([str(tmp_path), "--at", "24h"]) == 2
    assert "sweep.csv not found" in capsys.readouterr().err


@pytest.mark.slow
def test_real_tiny_sweep(tiny_prepped, tmp_path, capsys):
    """Two variants, one image budget, through fastvit-train subprocesses."""
    out = tmp_path / "sw"
    rc = sweep_main(["--data", str(tiny_prepped), "--out", str(out), "--budgets", "2ep", "--variants",
                     "fastvit,no-locality", "--preset", "test", "--device", "cpu", "--set", "backend=dali",
                     "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rows = (out / "sweep.csv").read_text().splitlines()
    assert len(rows) == 3
    res = json.loads((out / "runs" / "no-locality" / "2ep" / "s0" / "results.json").read_text())
    assert res["model"] == "vit_tiny_plain" and res["images_seen"] == 2 * 64 // 16 * 16
    assert (out / "top1_vs_budget.png").is_file()


def test_train_prints_the_sweeps_expected_top1(tiny_prepped, tmp_path, monkeypatch, capsys):
    from fastvit.train import cli as train_cli

    out = tmp_path / "sw"
    _fake_training(monkeypatch)
    assert sweep_main(["--data", str(tiny_prepped), "--out", str(out), *ARGS]) == 0
    capsys.readouterr()
    monkeypatch.setattr("fastvit.train.loop.train", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert train_cli.main(["--data", str(tiny_prepped), "--minutes", "16", "--device", "cpu",
                           "--out", str(tmp_path / "run"), "--expect-from", f"{out}:no-pss"]) == 130
    err = capsys.readouterr().err
    expect = 100 * (1 - float(bnsl.bnsl(960.0, 0.2, 1.0, 0.3)))
    line = next(x for x in err.splitlines() if "expected final top-1" in x)
    assert abs(float(line.split("≈ ")[1].split("%")[0]) - expect) < 0.3 and "runs of no-pss" in line
    train_cli.main(["--data", str(tiny_prepped), "--minutes", "16", "--device", "cpu", "--out",
                    str(tmp_path / "run"), "--expect-from", f"{out}:nope"])
    assert "no expected top-1" in capsys.readouterr().err


def test_variants_resolve_against_the_preset():
    from fastvit.sweep.variants import check

    res = [64, 96, 128]
    assert check("fastvit", "cpu", {}, res) == {}
    assert check("no-curriculum", "cpu", {}, res) == {"curriculum": "96:1"}                # the cpu preset's final res
    assert check("no-curriculum", "gpu", {}, res) == {"curriculum": "128:1"}               # the data's largest
    assert check("no-locality", "cpu", {"model": "vit_small_local"}, res) == {"model": "vit_small_plain"}
    assert check("plain-shards", "cpu", {}, res) == {"model": "vit_tiny_plain", "curriculum": "96:1", "keep_min": 1.0}
    assert check("add-curriculum", "cpu", {}, res) == {"model": "vit_tiny_plain", "curriculum": "64:0.5,96:0.5",
                                                       "keep_min": 1.0}
    assert check("add-pss+lr=3e-3", "cpu", {}, res)["keep_min"] == 0.5
    assert check("baseline+warmup=0.1", "cpu", {}, res) == {"recipe": "baseline", "warmup": 0.1}
    assert check("all", "cpu", {}, res) == {"model": "vit_tiny_local", "curriculum": "64:0.5,96:0.5", "keep_min": 0.5}
    assert check("all", "cpu", {"model": "vit_tiny_plain"}, res)["model"] == "vit_tiny_local"
    assert check("growth", "cpu", {}, res) == {"growth": "manual"}


def test_jobs_run_at_once_with_a_share_of_the_cores_each(tiny_prepped, tmp_path, monkeypatch):
    """--jobs 3: never more than 3 runs at once, and more than one; each gets threads/workers = cores // 3."""
    import threading
    import time

    lock, live, peak, seen = threading.Lock(), [0], [0], []

    def fake(job, cmd, env=None):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            seen.append((cmd, env))
        time.sleep(0.05)
        job.run_dir.mkdir(parents=True, exist_ok=True)
        (job.run_dir / "results.json").write_text(json.dumps(
            {"top1": 50.0, "images_seen": 10, "counted_s": 1.0, "steps": 1}))
        with lock:
            live[0] -= 1
        return 0

    monkeypatch.setattr(runner, "subprocess_runner", fake)
    monkeypatch.setattr("fastvit.sysinfo.default_workers", lambda w=None: 6)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    out = tmp_path / "sw"
    assert sweep_main(["--data", str(tiny_prepped), "--out", str(out), *ARGS, "--jobs", "3"]) == 0
    assert len(seen) == 24 and 1 < peak[0] <= 3
    for cmd, env in seen:
        assert env["OMP_NUM_THREADS"] == "2" and cmd[cmd.index("--workers") + 1] == "2"
    assert len((out / "sweep.csv").read_text().splitlines()) == 1 + 24


def test_slot_env_gives_each_slot_one_gpu_round_robin(monkeypatch):
    monkeypatch.setattr("fastvit.sysinfo.default_workers", lambda w=None: 8)
    env, flags = runner.slot_env(3, 4, "cuda", base={"CUDA_VISIBLE_DEVICES": "4,5", "OMP_NUM_THREADS": "1"})
    assert env["CUDA_VISIBLE_DEVICES"] == "5" and env["OMP_NUM_THREADS"] == "1"     # a set OMP_NUM_THREADS is kept
    assert flags == ["--workers", "2"]                                               # workers: 8 cores // 4
    env, flags = runner.slot_env(0, 1, "cuda", base={"CUDA_VISIBLE_DEVICES": "4,5"})
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5" and flags == []          # one at a time: nothing changed
    env, _ = runner.slot_env(1, 2, "cpu", base={})
    assert "CUDA_VISIBLE_DEVICES" not in env


def test_parallel_wsd_waits_for_the_segment_it_continues_and_skips_after_a_failure(tiny_prepped, tmp_path, monkeypatch,
                                                                                capsys):
    """--schedule both --jobs 4: a trunk segment or branch never starts before the run it continues has
    finished; when a trunk segment fails, what continues it is not run and the independent runs still are."""
    import threading
    import time

    order, lock = [], threading.Lock()

    def fake(job, cmd, env=None):
        if "--init-from" in cmd:                          # what it continues has finished (else the sweep fails)
            assert (runner.Path(cmd[cmd.index("--init-from") + 1]) / "results.json").is_file()
        time.sleep(0.02)
        with lock:
            order.append(job)
        if job.kind == "trunk" and job.budget.label == "4m":
            return 1                                      # a crashed segment: no results.json
        job.run_dir.mkdir(parents=True, exist_ok=True)
        (job.run_dir / "results.json").write_text(json.dumps(
            {"top1": 50.0, "images_seen": 10, "counted_s": 1.0, "steps": 1}))
        return 0

    monkeypatch.setattr(runner, "subprocess_runner", fake)
    out = tmp_path / "sw"
    rc = sweep_main(["--data", str(tiny_prepped), "--out", str(out), "--budgets", "1m,2m,4m,8m", "--variants",
                     "fastvit,no-pss", "--seeds", "1", "--device", "cpu", "--no-progress", "--schedule", "both",
                     "--wsd-variants", "fastvit", "--jobs", "4"])
    assert rc == 1
    ran = {(j.kind, j.variant, j.budget.label) for j in order}
    assert {("run", v, b) for v in ("fastvit", "no-pss") for b in ("1m", "2m", "4m", "8m")} <= ran
    assert ("trunk", "fastvit", "2m") in ran and ("branch", "fastvit", "2m") in ran
    assert ("branch", "fastvit", "4m") not in ran and ("trunk", "fastvit", "8m") not in ran
    assert not any(j.variant == "no-pss" and j.kind != "run" for j in order)       # WSD only for fastvit
    err = capsys.readouterr().err
    assert "fastvit 8m seed 0 not run: the run it continues failed" in err
    assert "| fastvit (wsd) |" in (out / "table.md").read_text()
    wsd = (out / "wsd.md").read_text()
    assert "| fastvit | 2m | 50.00 (1) | 50.00 (1) | +0.00 | – |" in wsd and "| fastvit | 4m |" not in wsd


def test_sigterm_stops_the_sweep_and_its_runs(tiny_prepped, tmp_path):
    """SIGTERM to a sweep with --jobs 2 stops the runs it started (they would otherwise live on unowned) and
    exits 130 with the one-line 'run again' message."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pids = tmp_path / "pids"
    pids.mkdir()
    script = f"""
import sys
from fastvit.sweep import runner
from fastvit.sweep.cli import sweep_main
runner.train_command = lambda job, *a: [sys.executable, "-c",
    "import os, time, pathlib; pathlib.Path({str(pids)!r}, str(os.getpid())).touch(); time.sleep(120)"]
sys.exit(sweep_main(["--data", {str(tiny_prepped)!r}, "--out", {str(tmp_path / 'sw')!r}, "--budgets", "1m",
                     "--variants", "fastvit,no-pss", "--device", "cpu", "--no-progress", "--jobs", "2"]))
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 600                        # generous: start-up on a loaded 2-core machine
    while len(list(pids.iterdir())) < 2 and time.monotonic() < end and proc.poll() is None:
        time.sleep(0.1)
    children = [int(p.name) for p in pids.iterdir()]
    assert len(children) == 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "run the same command again to continue" in err
    time.sleep(0.2)
    for pid in children:
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        assert not alive, f"run {pid} outlived its sweep"


def test_a_yaml_variant_takes_the_files_settings_but_not_the_runs(tiny_prepped, tmp_path, monkeypatch, capsys):
    """search=best.yaml: fastvit-search's config as a variant named 'search', less its data/budget/out/seed."""
    from fastvit.sweep.variants import check, label

    best = tmp_path / "best.yaml"
    best.write_text("data: /elsewhere\nhours: 0.25\nout: runs/x\nseed: 3\nmodel: vit_tiny_plain\ndepth: 2\n"
                    "embed_dim: 128\nnum_heads: 4\n")
    assert label(f"search={best}") == "search" and label(f"search={best}+lr=3e-3") == "search+lr=3e-3"
    nested = tmp_path / "nested.yaml"                      # fastvit-search writes fastvit-train's sections
    nested.write_text("data:\n  root: /elsewhere\n  curriculum: '64:1'\nbudget:\n  hours: 0.25\nrun:\n  device: cpu\n"
                      "model:\n  name: vit_tiny_plain\n  depth: 2\n  embed_dim: 440\n  patch_size: 16\n")
    assert check(f"s={nested}", "cpu", {}, [64, 96]) == {"model": "vit_tiny_plain", "depth": 2, "embed_dim": 440,
                                                         "patch_size": 16, "curriculum": "64:1"}
    (tmp_path / "typo.yaml").write_text("model:\n  dept: 2\n")
    with pytest.raises(ConfigError, match=f"variant file {tmp_path}/typo.yaml: unknown setting model.dept"):
        check(f"s={tmp_path}/typo.yaml", "cpu", {}, [64, 96])
    assert check(f"search={best}", "cpu", {}, [64, 96]) == {"model": "vit_tiny_plain", "depth": 2, "embed_dim": 128,
                                                            "num_heads": 4}
    calls = _fake_training(monkeypatch)
    out = tmp_path / "sw"
    assert sweep_main(["--data", str(tiny_prepped), "--out", str(out), "--budgets", "1m", "--variants",
                       f"fastvit,search={best}", "--device", "cpu", "--no-progress"]) == 0
    assert [c[0].variant for c in calls] == ["fastvit", "search"]
    assert "depth: 2" in (out / "configs" / "search.yaml").read_text()
    assert "| search |" in (out / "table.md").read_text()
    (tmp_path / "bad.yaml").write_text("- a list\n")
    assert sweep_main(["--data", str(tiny_prepped), "--out", str(out), "--variants", f"s={tmp_path}/bad.yaml"]) == 2
    assert "must hold a mapping of settings" in capsys.readouterr().err
    assert sweep_main(["--data", str(tiny_prepped), "--out", str(out), "--variants", f"s={tmp_path}/none.yaml"]) == 2
    assert "variant file" in capsys.readouterr().err
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    for variants_arg, msg in ((f"s={tmp_path}/bin.yaml", "not a text file"), (f"={best}", "needs a NAME"),
                              (f"fastvit,fastvit={best}", "variant 'fastvit' is given twice")):
        assert sweep_main(["--data", str(tiny_prepped), "--out", str(out), "--variants", variants_arg]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


def test_a_refused_forecast_is_an_answer_the_sweep_exits_0(tiny_prepped, tmp_path, monkeypatch, capsys):
    """Every run succeeded, every fit refused to extrapolate 180x: the tables are written and the exit is 0."""
    out = tmp_path / "sw"
    _fake_training(monkeypatch)
    assert sweep_main(["--data", str(tiny_prepped), "--out", str(out), *ARGS, "--forecast", "24h"]) == 0
    err = capsys.readouterr().err
    assert "fastvit-forecast: fastvit: refusing to extrapolate 180x" in err
    assert (out / "forecast.md").is_file() and (out / "table.md").is_file()


SCALING_TRUE = {"E": 0.1, "A": 60.0, "alpha": 0.5, "B": 30.0, "beta": 0.5}
C_TRUE = 0.8


def _fake_shaped_training(monkeypatch, classes):
    """Runs whose top-1 follows a known joint law in N (the shape's parameters) and D (images seen, fewer for
    bigger nets: 2e9 images per budget-second over N)."""
    from fastvit.models.shapes import param_count
    from fastvit.scaling import credit, law_error
    from fastvit.sweep.scaling_fit import split_shape

    calls = []

    def fake(job, cmd, env=None):
        calls.append((job, cmd))
        _, shape = split_shape(job.variant)
        n = param_count(shape, classes)
        d = int(2e4 * job.budget.seconds * 1e5 / n)
        extra, d_law = {}, d
        if "growth=manual" in job.variant:               # half the images at half the depth, worth credit(C_TRUE)
            depth = int(shape.split("-")[0][1:])
            early = d // 2
            extra = {"stages": [{"steps": early, "batch_size": 1, "depth": depth // 2},
                                {"steps": d - early, "batch_size": 1, "depth": depth}]}
            d_law = d - early + credit(depth // 2, depth, C_TRUE) * early
        job.run_dir.mkdir(parents=True, exist_ok=True)
        (job.run_dir / "results.json").write_text(json.dumps(
            {"top1": 100 * (1 - float(law_error(SCALING_TRUE, n, d_law))), "images_seen": d,
             "counted_s": job.budget.seconds, "steps": 10, **extra}))
        return 0

    monkeypatch.setattr(runner, "subprocess_runner", fake)
    return calls


def test_shapes_axis_and_fit_scaling(tiny_prepped, tmp_path, monkeypatch, capsys):
    """--shapes crosses the variant with each shape (fastvit-train gets the shape's depth/width/heads/MLP
    through the variant's config); --fit-scaling fits the law on the runs, recovers it and writes scaling.json."""
    import yaml

    from fastvit import manifest
    from fastvit.models.shapes import param_count
    from fastvit.scaling import load_law

    classes = len(manifest.read(tiny_prepped)["classes"])
    calls = _fake_shaped_training(monkeypatch, classes)
    out = tmp_path / "sw"
    shapes = ["d1-w64", "d2-w64", "d2-w128", "d4-w128", "d3-w96-h2"]
    assert sweep_main(["--data", str(tiny_prepped), "--out", str(out), "--budgets", "1m,2m,4m,8m", "--variants",
                       "fastvit", "--shapes", ",".join(shapes), "--device", "cpu", "--no-progress",
                       "--fit-scaling"]) == 0
    assert len(calls) == 20
    cfg = yaml.safe_load((out / "configs" / "fastvit_shape=d3-w96-h2.yaml").read_text())
    assert cfg == {"depth": 3, "embed_dim": 96, "num_heads": 2, "mlp_ratio": 4.0}
    job, cmd = next(c for c in calls if c[0].variant == "fastvit+shape=d3-w96-h2")
    assert cmd[cmd.index("--config") + 1] == str(out / "configs" / "fastvit_shape=d3-w96-h2.yaml")
    law = load_law(out / "scaling.json")
    assert len(law.points) == 20 and {p["shape"] for p in law.points} == set(shapes)
    assert {p["params"] for p in law.points} == {param_count(s, classes) for s in shapes}
    for k, v in SCALING_TRUE.items():
        assert law.params[k] == pytest.approx(v, rel=0.02), k
    assert law.loo["rmse"] < 0.1 and {b["budget"] for b in law.loo["by_budget"]} == {"1m", "2m", "4m", "8m"}
    assert law.data["classes"] == classes and law.data["resolution"] == 96     # the cpu preset's final res
    printed = capsys.readouterr().out
    assert "Scaling law of fastvit: err = " in printed and f"wrote {out}/scaling.json" in printed
    assert "| d3-w96-h2 |" in (out / "scaling.md").read_text()


def test_fit_scaling_fits_the_growth_term_on_growing_runs(tiny_prepped, tmp_path, monkeypatch, capsys):
    """Growing runs (variant +growth=manual) stay out of the fixed-size law and fit its growth term's c."""
    from fastvit import manifest
    from fastvit.scaling import load_law

    classes = len(manifest.read(tiny_prepped)["classes"])
    _fake_shaped_training(monkeypatch, classes)
    out = tmp_path / "sw"
    variants = ",".join(f"fastvit+shape={s}" for s in ("d1-w64", "d2-w64", "d2-w128", "d4-w128")) + \
        ",fastvit+shape=d4-w128+growth=manual,fastvit+shape=d2-w128+growth=manual"
    assert sweep_main(["--data", str(tiny_prepped), "--out", str(out), "--budgets", "1m,2m,4m", "--variants",
                       variants, "--device", "cpu", "--no-progress", "--fit-scaling"]) == 0
    law = load_law(out / "scaling.json")                 # one recipe: the growing runs are fastvit's too
    assert len(law.points) == 12 and not any(p["shape"].endswith("+grow") for p in law.points)
    for k, v in SCALING_TRUE.items():
        assert law.params[k] == pytest.approx(v, rel=0.02), k
    g = law.growth
    assert g["c"] == pytest.approx(C_TRUE, abs=0.01) and len(g["points"]) == 6
    assert {p["shape"] for p in g["points"]} == {"d4-w128+grow", "d2-w128+grow"}
    assert all(p["images_shallow"] == {str(p["depth"] // 2): p["images"] // 2} for p in g["points"])
    assert len(g["loo"]["cs"]) == 3 and g["loo"]["rmse"] < 0.1
    md = (out / "scaling.md").read_text()
    assert "Growth term: c = 0.800" in md and "| d4-w128+grow |" in md


def test_fit_scaling_refusal_is_one_line_and_exit_0(tiny_prepped, tmp_path, monkeypatch, capsys):
    classes = len(__import__("fastvit.manifest", fromlist=["read"]).read(tiny_prepped)["classes"])
    _fake_shaped_training(monkeypatch, classes)
    out = tmp_path / "sw"
    assert sweep_main(["--data", str(tiny_prepped), "--out", str(out), "--budgets", "1m,2m,4m", "--variants",
                       "fastvit+shape=d2-w64", "--device", "cpu", "--no-progress", "--fit-scaling"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if "scaling fit" in ln]
    assert err == ["fastvit-sweep: scaling fit of fastvit refused: the law has 5 free parameters (E, A, alpha, B, "
                   "beta): it needs at least 6 points, got 3"]
    assert not (out / "scaling.json").exists()


@pytest.mark.parametrize("argv, msg", [
    (["--shapes", "d2-x"], "--shapes: shape 'd2-x' is not d<depth>-w<width>"),
    (["--shapes", ","], "--shapes is empty"),
    (["--variants", "fastvit+shape=d2-w100-h3"], "3 heads do not divide width 100"),
])
def test_bad_shapes_are_one_line_exit_2(tiny_prepped, tmp_path, capsys, argv, msg):
    assert sweep_main(["--data", str(tiny_prepped), "--out", str(tmp_path / "s"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


def test_shape_variant_resolves_to_model_overrides():
    from fastvit.sweep.variants import check

    assert check("fastvit+shape=d2-w192", "cpu", {}, [64, 96]) == {"depth": 2, "embed_dim": 192, "num_heads": 3,
                                                                  "mlp_ratio": 4.0}
    assert check("no-pss+shape=d6-w384-h6-m2", "cpu", {}, [64, 96])["mlp_ratio"] == 2.0
