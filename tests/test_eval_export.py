"""fastvit-eval and fastvit-export on a tiny CPU run: the eval grid reproduces the trainer's own final
top-1 at its final res and keep 1, a data set with other classes is one line and exit 2, a run still in
progress (its lock held, no results) is read, a grown run is evaluated and exported at its depth, and
both export formats give the same logits as the run's model on a fixed batch."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fastvit.eval import load_run, main as eval_main
from fastvit.export_cli import main as export_main
from fastvit.train.checkpoint import rng_state, save_checkpoint
from fastvit.train.cli import main as train_main
from fastvit.train.config import make_config

TINY = ["--preset", "test", "--device", "cpu", "--backend", "dali", "--no-progress"]


@pytest.fixture(scope="module")
def plain_run(tiny_prepped, tmp_path_factory) -> Path:
    """A finished tiny training of a `_plain` model (exportable to timm), EMA kept."""
    run = tmp_path_factory.mktemp("plain") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)        # the PyTorch reference embedding: fast on CPU
        rc = train_main(["--data", str(tiny_prepped), "--out", str(run), "--epochs", "6", "--evals", "0",
                         "--model", "vit_tiny_plain", "--no-tensorboard", *TINY])
    assert rc == 0
    return run


@pytest.fixture(autouse=True)
def _reference_patch_embed(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _images(n=4, res=32):
    return torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _grid(path: Path) -> dict:
    return {(r["res"], r["keep"]): r for r in json.loads(path.read_text())["grid"]}


def test_eval_grid_matches_the_trainers_final_top1(plain_run, tiny_prepped, tmp_path, capsys):
    res = json.loads((plain_run / "results.json").read_text())
    out = tmp_path / "e.json"
    rc = eval_main([str(plain_run), "--data", str(tiny_prepped), "--res", "32,64", "--keep", "1,0.5",
                    "--device", "cpu", "--json", str(out), "--no-progress"])
    assert rc == 0
    grid = _grid(out)
    assert set(grid) == {(32, 1.0), (32, 0.5), (64, 1.0), (64, 0.5)}
    assert res["eval_res"] == 32
    at_final = grid[(32, 1.0)]
    assert at_final["top1"] == res["top1"] and at_final["top5"] == res["top5"]   # the trainer's own number
    assert at_final["images"] == res["val_images"] == 24
    assert grid[(32, 0.5)]["patches"] == 2 and grid[(64, 1.0)]["patches"] == 16
    assert all(r["images_per_s"] > 0 and r["wall_images_per_s"] > 0 for r in grid.values())
    printed = capsys.readouterr().out
    assert "top-1" in printed and f"{res['top1']:.2f}" in printed and "step" in printed
    # the kept patches are a seeded draw: the same grid point twice gives the same numbers
    assert eval_main([str(plain_run), "--res", "32", "--keep", "0.5", "--device", "cpu", "--json",
                      str(tmp_path / "again.json"), "--no-progress"]) == 0
    assert _grid(tmp_path / "again.json")[(32, 0.5)]["top1"] == grid[(32, 0.5)]["top1"]
    # --ema: the EMA's final number; default output RUN_DIR/eval.json
    assert eval_main([str(plain_run), "--ema", "--keep", "1", "--device", "cpu", "--no-progress"]) == 0
    ema = json.loads((plain_run / "eval.json").read_text())
    assert ema["weights"] == "ema" and ema["grid"][0]["top1"] == res["ema_top1"]


def test_eval_refuses_a_data_set_with_other_classes(plain_run, tiny_prepped, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_prepped, other)
    m = json.loads((other / "manifest.json").read_text())
    m["classes"] = [f"x{i}" for i in range(len(m["classes"]))]
    (other / "manifest.json").write_text(json.dumps(m))
    rc = eval_main([str(plain_run), "--data", str(other), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "other classes than the run" in err[0], err
    for argv in (["--res", "30"], ["--keep", "0"], ["--keep", "a,b"], ["--split", "test"], ["--batch-size", "0"]):
        rc = eval_main([str(plain_run), "--device", "cpu", "--no-progress", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, (argv, err)
    assert eval_main([str(tmp_path / "nope"), "--device", "cpu"]) == 2
    with pytest.raises(SystemExit) as e:                        # argparse: the weights are one choice
        eval_main([str(plain_run), "--ema", "--raw"])
    assert e.value.code == 2


def test_export_round_trips_both_formats(plain_run, tmp_path, capsys):
    import timm
    from safetensors.torch import load_file

    from fastvit.models.export import load_export

    run_model = load_run(plain_run).model
    x = _images()
    with torch.no_grad():
        ref = run_model(x)
    data_root = Path(json.loads((plain_run / "config.json").read_text())["data"]["root"])
    # safetensors: fastvit's model rebuilt from the file's own config
    st = tmp_path / "st"
    assert export_main([str(plain_run), "--out", str(st)]) == 0
    assert {"README.md", "config.json", "model.safetensors", "results.json"} <= {p.name for p in st.iterdir()}
    with torch.no_grad():
        assert torch.equal(load_export(st).eval()(x), ref)
    cfg = json.loads((st / "config.json").read_text())
    assert cfg["label_names"] == json.loads((data_root / "manifest.json").read_text())["classes"]
    assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32] and len(cfg["pretrained_cfg"]["mean"]) == 3
    card = (st / "README.md").read_text()
    res = json.loads((plain_run / "results.json").read_text())
    assert f"{res['top1']:.2f}%" in card and "budget" in card and "machine" in card
    # timm: plain timm calls, no fastvit, on the normalized float image
    tm = tmp_path / "timm"
    assert export_main([str(plain_run), "--out", str(tm), "--format", "timm"]) == 0
    cfg = json.loads((tm / "config.json").read_text())
    model = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"], **cfg["model_args"]).eval()
    model.load_state_dict(load_file(str(tm / "model.safetensors")))
    mean = torch.tensor(cfg["pretrained_cfg"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["pretrained_cfg"]["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model((x.float() / 255 - mean) / std), ref, rtol=1e-4, atol=1e-4)
        hub = timm.create_model(f"local-dir:{tm}", pretrained=True).eval()     # timm's own folder loader
        torch.testing.assert_close(hub((x.float() / 255 - mean) / std), ref, rtol=1e-4, atol=1e-4)
    # a second export into the same folder needs --overwrite
    capsys.readouterr()
    assert export_main([str(plain_run), "--out", str(tm), "--format", "timm"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.fixture
def grown_run(tiny_prepped, tmp_path) -> Path:
    """A run dir as a --growth run in progress leaves it: a checkpoint of a 2-block locality model that
    runs its first block (growth depth 1) and a damaged newer one, no results.json."""
    cfg = make_config("test", {"data": str(tiny_prepped), "depth": 2, "epochs": 1.0})
    torch.manual_seed(0)
    from fastvit.models import create_model

    model = create_model(cfg.model.name, num_classes=4, **cfg.model.overrides())
    run = tmp_path / "run"
    state = {"config": cfg.to_dict(), "model": model.state_dict(), "ema": None, "step": 7, "counted_s": 3.0,
             "opt": {}, "plan": {}, "rng": rng_state(), "growth": {"depth": 1, "window": None}}
    save_checkpoint(run, 7, state)
    newer = save_checkpoint(run, 9, {**state, "step": 9})
    newer.write_bytes(newer.read_bytes()[:-100])                 # damaged: the previous one is read
    return run


def test_in_progress_grown_run_evaluates_and_exports_at_its_depth(grown_run, tmp_path, capsys):
    from fastvit.models.export import load_export
    from fastvit.train.rundir import RunLock

    with RunLock(grown_run) as lock:                             # the training holds the run's lock
        lock.hold()
        rc = eval_main([str(grown_run), "--keep", "1,0.5", "--device", "cpu"])       # with the progress bar
        assert rc == 0
        assert "ckpt_00000009.pt: truncated" in capsys.readouterr().err         # the damaged one, said once
        out = json.loads((grown_run / "eval.json").read_text())
        assert out["depth"] == 1 and out["finished"] is False and out["step"] == 7 and len(out["grid"]) == 2
        assert eval_main([str(grown_run), "--ema", "--device", "cpu"]) == 2           # no EMA kept
        assert "--raw" in capsys.readouterr().err
        rm = load_run(grown_run)
        assert rm.depth == 1 and rm.results is None
        st = tmp_path / "st"
        assert export_main([str(grown_run), "--out", str(st)]) == 0
        exported = load_export(st).eval()
        assert exported.cfg.depth == 1 and len(exported.blocks) == 1
        x = _images()
        with torch.no_grad():
            assert torch.equal(exported(x), rm.model(x))
        assert "still training" in (st / "README.md").read_text()
        assert not (st / "results.json").exists()
        capsys.readouterr()
        rc = export_main([str(grown_run), "--out", str(tmp_path / "t"), "--format", "timm"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and "[fastvit-export] checkpoint ckpt_00000009.pt" in err[0]
        assert len(err) == 2 and "locality" in err[1] and "timm" in err[1]


def test_eval_of_a_baseline_run(tiny_prepped, tmp_path, capsys):
    """--recipe baseline (timm's ViT behind our forward): rebuilt at its own size, the trainer's number at
    its resolution, another resolution through timm's pos-embed resampling; keep < 1 and export refused."""
    run = tmp_path / "base"
    rc = train_main(["--data", str(tiny_prepped), "--out", str(run), "--recipe", "baseline", "--epochs", "2",
                     "--evals", "0", "--no-tensorboard", *TINY[:-3], "--no-progress"])
    assert rc == 0
    res = json.loads((run / "results.json").read_text())
    assert eval_main([str(run), "--res", f"{res['eval_res']},64", "--device", "cpu", "--no-progress"]) == 0
    grid = _grid(run / "eval.json")
    assert set(grid) == {(res["eval_res"], 1.0), (64, 1.0)}                  # keep defaults to 1 for the baseline
    assert grid[(res["eval_res"], 1.0)]["top1"] == res["top1"]
    capsys.readouterr()
    assert eval_main([str(run), "--keep", "0.5", "--device", "cpu"]) == 2
    assert export_main([str(run), "--out", str(tmp_path / "x")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2             # one line each
