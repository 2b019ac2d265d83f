"""Progressive growth (MoGrow / AutoProg, issue 13): the duplication map, MoGrow's weights, EMA and
optimizer at a growth, the elastic supernet, the time-aware choice, and a resume across a growth."""
from __future__ import annotations

import json

import pytest
import torch

from fastvit.models import create_model
from fastvit.models.grow import (compact, grow_map, remap_blocks_, remap_optimizer_state_, set_blocks, set_depth,
                                 supernet_blocks)
from fastvit.train.growth import candidate_depths, choose, depth_schedule, fit_power

TINY = dict(depth=6, embed_dim=32, num_heads=2, img_size=32, num_classes=4)
TRAIN = ["--preset", "test", "--device", "cpu", "--backend", "dali", "--no-progress", "--depth", "4",
         "--curriculum", "32:0.5,64:0.5", "--final-res", "64", "--keep-min", "1.0", "--evals", "0"]


@pytest.fixture(autouse=True)
def _reference_patch_embed(monkeypatch):
    """The PyTorch reference embedding (the Triton interpreter would take seconds per step)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _authors_new_idx(idx, prev_l, new_l):
    """The authors' released rule (AutoProg, prog/helpers.py `new_idx`), transcribed as a reference."""
    if idx * prev_l // (new_l // prev_l * prev_l) < (prev_l - new_l % prev_l):
        return idx * prev_l // (new_l // prev_l * prev_l)
    return (idx + (prev_l - new_l % prev_l)) * prev_l // (new_l // prev_l * prev_l + prev_l)


def test_grow_map_duplicates_the_last_blocks_in_place():
    assert grow_map(6, 8) == [0, 1, 2, 3, 4, 4, 5, 5]
    assert grow_map(6, 12) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert grow_map(4, 6) == [0, 1, 2, 2, 3, 3]
    assert grow_map(5, 5) == [0, 1, 2, 3, 4]
    for old in range(1, 9):
        for new in range(old, 2 * old + 5):
            assert grow_map(old, new) == [_authors_new_idx(i, old, new) for i in range(new)], (old, new)


def test_depth_schedule_and_candidates():
    assert depth_schedule(4, 12, 0.5, 1.0) == [6, 8, 10, 12]       # the authors' 12-block schedule
    assert depth_schedule(2, 4, 0.5, 1.0) == [2, 4]
    assert candidate_depths(2, 4) == [2, 3, 4]
    assert candidate_depths(6, 12) == [6, 8, 10, 12]
    assert candidate_depths(4, 4) == [4]


def _blocks_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_supernet_at_a_shallower_candidate_is_the_shallower_model():
    torch.manual_seed(0)
    m = create_model("vit_tiny_plain", **TINY).eval()
    set_depth(m, 3)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    sup = create_model("vit_tiny_plain", **TINY).eval()
    sup.load_state_dict(m.state_dict())
    remap_blocks_(sup, grow_map(3, 6))                                # the supernet: 3 -> 6
    with torch.no_grad():                                             # train the copies apart
        for p in sup.parameters():
            p.add_(0.01 * torch.randn_like(p))
    for cand in (3, 4, 5, 6):
        pos = supernet_blocks(3, cand, 6)
        assert len(pos) == cand and pos == sorted(pos)
        set_blocks(sup, pos)
        # the shallower model: a plain `cand`-block model holding exactly those blocks
        ref = compact(sup).eval()
        assert len(ref.blocks) == cand
        torch.testing.assert_close(sup(x), ref(x), rtol=0, atol=0)
    # at the growth (before training) the candidate's blocks are the model grown 3 -> cand
    fresh = create_model("vit_tiny_plain", **TINY).eval()
    fresh.load_state_dict(m.state_dict())
    remap_blocks_(fresh, grow_map(3, 6))
    grown = create_model("vit_tiny_plain", **TINY).eval()
    grown.load_state_dict(m.state_dict())
    remap_blocks_(grown, grow_map(3, 5))
    set_blocks(fresh, supernet_blocks(3, 5, 6))
    set_depth(grown, 5)
    torch.testing.assert_close(fresh(x), grown(x), rtol=0, atol=0)


def test_choice_is_a_pure_function_of_the_scores():
    cands = [{"depth": 2, "loss": 2.0, "step_time": 1.0}, {"depth": 3, "loss": 1.5, "step_time": 1.5},
             {"depth": 4, "loss": 1.4, "step_time": 2.0}]
    got = choose(cands)
    assert got == choose([dict(c) for c in cands])                   # same in, same out
    _, a = fit_power([1.0, 1.5, 2.0], [2.0, 1.5, 1.4])
    assert got["a"] == pytest.approx(a) and got["w"] == pytest.approx(max(-a, 0.0))
    scores = [c["loss"] * c["step_time"] ** got["w"] for c in cands]
    assert got["scores"] == pytest.approx(scores)
    assert got["choice"] == min(range(3), key=lambda i: scores[i])
    # deeper is no better (loss rises with time): w = 0, the lowest loss wins
    flat = choose([{"depth": 2, "loss": 1.0, "step_time": 1.0}, {"depth": 4, "loss": 1.2, "step_time": 2.0}])
    assert flat["w"] == 0.0 and flat["choice"] == 0
    # two candidates lie on their own fitted curve: equal scores, the shallower wins the tie
    two = choose([{"depth": 2, "loss": 3.0, "step_time": 1.0}, {"depth": 4, "loss": 1.0, "step_time": 1.1}])
    assert two["scores"][0] == pytest.approx(two["scores"][1]) and two["choice"] == 0
    # the candidate furthest below the loss-time curve wins
    assert choose([{"depth": 2, "loss": 3.0, "step_time": 1.0}, {"depth": 3, "loss": 2.5, "step_time": 1.05},
                   {"depth": 4, "loss": 1.0, "step_time": 1.1}])["choice"] == 2


def test_optimizer_state_moves_with_the_blocks():
    torch.manual_seed(0)
    m = create_model("vit_tiny_plain", **TINY)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    set_depth(m, 3)
    m(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)).sum().backward()
    opt.step()
    named = dict(m.named_parameters())
    before = {n: opt.state[p]["exp_avg"].clone() for n, p in named.items() if p in opt.state}
    assert "blocks.3.norm1.weight" not in before                     # inactive blocks: no state
    remap_optimizer_state_(opt, m, grow_map(3, 5))
    for i, src in enumerate(grow_map(3, 5)):
        torch.testing.assert_close(opt.state[named[f"blocks.{i}.attn.qkv.weight"]]["exp_avg"],
                                   before[f"blocks.{src}.attn.qkv.weight"])


def _run(tmp_path, data, name, *extra):
    from fastvit.train.cli import main

    run = tmp_path / name
    assert main(["--data", str(data), "--out", str(run), *TRAIN, *extra]) == 0
    return run


def _load(run):
    return json.loads((run / "results.json").read_text())


def test_manual_growth_run_mogrow_ema_and_optimizer(tiny_prepped, tmp_path, monkeypatch):
    """A manual run: depth 2 at 32 px, 4 at 64 px; at the growth the EMA is grown from its own weights
    (not reset), the online model equals the grown EMA, and the optimizer covers every parameter once."""
    from fastvit.train import growth as G

    seen = {}
    real = G.Grower._mogrow

    def spy(self, new, step, clock):
        ema_before = {k: v.clone() for k, v in self.parts.ema.module.state_dict().items()}
        ev = real(self, new, step, clock)
        ema_after = self.parts.ema.module.state_dict()
        seen.update(map=ev["map"], ema_before=ema_before, ema_after={k: v.clone() for k, v in ema_after.items()},
                    online={k: v.clone() for k, v in self.parts.model.state_dict().items()},
                    opt_state=len(self.parts.opt.state),
                    groups=[id(p) for g in self.parts.opt.param_groups for p in g["params"]],
                    params=[id(p) for p in self.parts.model.parameters()])
        return ev

    monkeypatch.setattr(G.Grower, "_mogrow", spy)
    run = _run(tmp_path, tiny_prepped, "manual", "--epochs", "6", "--growth", "manual", "--growth-opt", "fresh")
    res = _load(run)
    assert [s["depth"] for s in res["stages"]] == [2, 4]
    assert seen["map"] == [0, 0, 1, 1]
    for k, v in seen["ema_after"].items():                             # EMA grown from its own weights
        if k.startswith("blocks."):
            i, rest = int(k.split(".")[1]), k.split(".", 2)[2]
            src = f"blocks.{seen['map'][i]}.{rest}" if i < 4 else k
            torch.testing.assert_close(v, seen["ema_before"][src], rtol=0, atol=0)
        else:
            torch.testing.assert_close(v, seen["ema_before"][k], rtol=0, atol=0)
    assert any(not torch.equal(seen["ema_before"][k], seen["ema_before"]["blocks.0." + k.split(".", 2)[2]])
               for k in seen["ema_before"] if k.startswith("blocks.1."))   # trained, not a fresh copy
    for k, v in seen["online"].items():                                 # online == the grown EMA
        torch.testing.assert_close(v, seen["ema_after"][k], rtol=0, atol=0)
    assert seen["opt_state"] == 0                                       # a fresh AdamW
    assert sorted(seen["groups"]) == sorted(seen["params"])             # every parameter exactly once
    assert len(set(seen["groups"])) == len(seen["groups"])
    plan = json.loads((run / "plan.json").read_text())
    assert plan["growth"]["events"][0]["from"] == 2 and plan["growth"]["events"][0]["to"] == 4
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["depth"] for r in rows if r["kind"] == "train"} == {2, 4}
    import csv

    with open(run / "metrics.csv") as f:                               # the CSV carries the depth too
        assert {r["depth"] for r in csv.DictReader(f) if r["kind"] == "train"} == {"2", "4"}


def test_resume_across_a_growth_reproduces_the_stage_sequence(tiny_prepped, tmp_path):
    from fastvit.train import checkpoint as C
    from fastvit.train.config import TrainConfig
    from fastvit.train.loop import train

    args = ("--epochs", "6", "--growth", "manual", "--growth-opt", "keep", "--ckpt-every-steps", "4")
    full = _run(tmp_path, tiny_prepped, "full", *args)
    cut = tmp_path / "cut"
    cfg = TrainConfig.from_dict(json.loads((full / "config.json").read_text()))
    cfg.run.out = str(cut)
    cfg.run.ckpt_every_steps = 4
    # stop the run right after the growth: a checkpoint past the growth is the one resumed from
    ck = C.load_checkpoint(C.checkpoint_paths(full)[0])
    total = ck["plan"]["total_steps"]
    grow_step = _load(full)["growth"]["events"][0]["step"]
    kept = [p for p in sorted(full.glob("ckpt_*.pt")) if grow_step < C.load_checkpoint(p)["step"] < total]
    assert kept, "no checkpoint between the growth and the end"
    cut.mkdir()
    import shutil

    shutil.copy(kept[0], cut / kept[0].name)
    (cut / "config.json").write_text((full / "config.json").read_text())
    res = train(cfg, resume=True, log=lambda m: None)
    ref = _load(full)
    assert [(s["res"], s["depth"], s["batch_size"], s["steps"]) for s in res["stages"]] == \
        [(s["res"], s["depth"], s["batch_size"], s["steps"]) for s in ref["stages"]]
    assert res["growth"]["events"] == ref["growth"]["events"]          # restored, not grown again
    assert res["top1"] == pytest.approx(ref["top1"])


def test_auto_growth_run_scores_candidates_and_exports(tiny_prepped, tmp_path):
    from fastvit.models import load_safetensors, save_safetensors
    from fastvit.train import checkpoint as C

    run = _run(tmp_path, tiny_prepped, "auto", "--epochs", "8", "--growth", "auto", "--growth-window", "0.2",
               "--growth-score-images", "16")
    res = _load(run)
    ev = [e for e in res["growth"]["events"] if e["kind"] == "choose"]
    assert len(ev) == 1 and [c["depth"] for c in ev[0]["candidates"]] == [2, 3, 4]
    got = choose(ev[0]["candidates"])
    assert ev[0]["candidates"][got["choice"]]["depth"] == ev[0]["depth"]
    assert res["stages"][-1]["depth"] == ev[0]["depth"]
    plan = json.loads((run / "plan.json").read_text())
    assert plan["growth"]["events"] == res["growth"]["events"]
    # the final model exports at the depth it runs
    m = create_model("vit_tiny_local", depth=4, embed_dim=32, num_heads=2, num_classes=4)
    m.load_state_dict(C.load_checkpoint(C.checkpoint_paths(run)[0])["model"])
    set_depth(m, ev[0]["depth"])
    path = save_safetensors(m, tmp_path / "m.safetensors")
    back = load_safetensors(path)
    assert len(back.blocks) == ev[0]["depth"]
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(back.eval()(x), m.eval()(x), rtol=0, atol=0)


def test_kill_in_the_search_window_resumes_to_the_same_choice(tiny_prepped, tmp_path, monkeypatch):
    """A run stopped by a checkpoint inside auto's supernet window (the Grower's window open) and
    resumed ends with the uninterrupted run's scores, choice and stage sequence. The candidates' step
    times (measured in the window) are replaced by deterministic ones; everything else is the real run."""
    from fastvit.train import checkpoint as C
    from fastvit.train import loop as L
    from fastvit.train.config import TrainConfig
    from fastvit.train.loop import train

    from fastvit.train import growth as G

    real_times = G.Grower._step_times
    measured = []

    def fake_times(self, w, stage):                  # the window's measured times, then deterministic ones
        measured.append({k: list(v) for k, v in w["times"].items()})
        real_times(self, w, stage)
        return {c: 0.01 * c for c in w["cands"]}

    monkeypatch.setattr(G.Grower, "_step_times", fake_times)
    args = ("--epochs", "8", "--growth", "auto", "--growth-window", "0.2", "--growth-score-images", "16")
    full = _run(tmp_path, tiny_prepped, "full", *args)
    ref = _load(full)
    ev = [e for e in ref["growth"]["events"] if e["kind"] == "choose"][0]
    cfg = TrainConfig.from_dict(json.loads((full / "config.json").read_text()))
    cfg.run.out = str(tmp_path / "cut")
    stop_at = ev["window"][0] + 2                                      # two steps into the window
    real_save = L.Live.save

    class Stop(Exception):
        pass

    def save_then_stop(live):
        path = real_save(live)
        if live.run.st.step == stop_at:                                # the run's state at the checkpoint
            raise Stop()
        return path

    cfg.run.ckpt_every_steps = 1
    monkeypatch.setattr(L.Live, "save", save_then_stop)
    with pytest.raises(Stop):
        train(cfg, log=lambda m: None)
    monkeypatch.setattr(L.Live, "save", real_save)
    ck = C.load_checkpoint(C.checkpoint_paths(tmp_path / "cut")[0])
    assert ck["step"] == stop_at and ck["growth"]["window"] is not None
    assert sum(map(len, ck["growth"]["window"]["times"].values())) == 1     # the window's steps so far, timed
    assert ck["growth"]["window"]["last"] is not None                      # (the second still running)
    res = train(cfg, resume=True, log=lambda m: None)
    got = [e for e in res["growth"]["events"] if e["kind"] == "choose"][0]
    assert got["depth"] == ev["depth"] and got["window"] == ev["window"]
    assert [c["step_time"] for c in got["candidates"]] == [c["step_time"] for c in ev["candidates"]]
    assert sum(map(len, measured[-1].values())) >= 5                        # timed window steps (one lost at the cut)
    # the trainer's resume is not bitwise (without growth too: a resumed --epochs run's losses differ from
    # its first resumed step on), so the scores agree to a few tenths of a percent
    assert [c["loss"] for c in got["candidates"]] == pytest.approx([c["loss"] for c in ev["candidates"]], rel=2e-2)
    assert [(s["res"], s["depth"], s["steps"]) for s in res["stages"]] == \
        [(s["res"], s["depth"], s["steps"]) for s in ref["stages"]]
