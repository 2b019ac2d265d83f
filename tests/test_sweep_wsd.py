"""Warmup-stable-decay in fastvit-sweep: the constant-LR schedule, the trunk/branch chain, and a real tiny
WSD sweep whose branches start from the right trunk checkpoint and end with LR 0 at their budget."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastvit.sweep import runner
from fastvit.sweep.cli import sweep_main
from fastvit.train import schedules as S


@pytest.fixture(autouse=True)
def _reference_patch_embed(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_constant_lr_warms_up_then_never_decays():
    assert S.lr_at(0.025, base_lr=1.0, warmup=0.05, decay="constant") == pytest.approx(0.5)
    assert [S.lr_at(p, base_lr=1.0, warmup=0.05, decay="constant") for p in (0.05, 0.5, 0.99, 1.0)] == [1.0] * 4
    assert S.lr_at(0.3, base_lr=1.0, warmup=0.0, decay="constant") == 1.0
    assert S.lr_at(1.0, base_lr=1.0, warmup=0.0, decay="linear") == 0.0          # a branch ends at 0


def test_wsd_plan_chains_trunk_segments_and_branches():
    budgets = [runner.parse_budget(b) for b in ("8m", "2m", "16m", "4m")]
    jobs = runner.plan_wsd_jobs(Path("/s"), ["fastvit"], budgets, 1, share=0.2)
    trunks = [j for j in jobs if j.kind == "trunk"]
    branches = [j for j in jobs if j.kind == "branch"]
    minutes = [float(j.flags[j.flags.index("--minutes") + 1]) for j in jobs]
    assert minutes == pytest.approx([1.6, 0.4, 1.6, 0.8, 3.2, 1.6, 6.4, 3.2])   # trunk (B_k − B_k−1)·0.8, branch 0.2·B_k
    assert sum(minutes[0::2]) == pytest.approx(0.8 * 16)                         # the trunk ends where 16m decays
    for k, (t, b) in enumerate(zip(trunks, branches)):
        assert "--init-from" not in t.flags if k == 0 else t.flags[t.flags.index("--init-from") + 1] == str(trunks[k - 1].run_dir)
        assert b.flags[b.flags.index("--init-from") + 1] == str(t.run_dir)      # branch k from trunk segment k
        assert b.parents == tuple(x.run_dir for x in trunks[:k + 1])
        assert t.flags[t.flags.index("--lr-decay") + 1] == "constant"
        assert b.flags[b.flags.index("--lr-decay") + 1] == "linear" and b.flags[b.flags.index("--warmup") + 1] == "0"
    s = runner.wsd_saving(jobs, 0.2)
    assert s["independent_budget"] == 30 * 60 and s["wsd_budget"] == pytest.approx((0.8 * 16 + 0.2 * 30) * 60)
    assert s["saving"] == pytest.approx(1 - 18.8 / 30)


def _rows(run: Path):
    return [r for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.slow
def test_real_tiny_wsd_sweep(tiny_prepped, tmp_path, capsys):
    out = tmp_path / "sw"
    rc = sweep_main(["--data", str(tiny_prepped), "--out", str(out), "--budgets", "5ep,10ep", "--variants", "fastvit",
                     "--schedule", "wsd", "--preset", "test", "--device", "cpu", "--set", "backend=dali",
                     "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    runs = out / "runs" / "fastvit"
    for label in ("5ep", "10ep"):
        trunk, branch = runs / f"wsd-trunk-{label}" / "s0", runs / f"{label}-wsd" / "s0"
        t_res = json.loads((trunk / "results.json").read_text())
        log = (out / "logs" / f"fastvit__{label}-wsd__s0.log").read_text()
        assert f"init from {trunk}/ckpt_{t_res['steps']:08d}.pt (step {t_res['steps']}," in log   # the trunk's last
        cfg = json.loads((branch / "config.json").read_text())
        assert cfg["run"]["init_from"] == str(trunk)
        plan = json.loads((branch / "plan.json").read_text())
        from fastvit.train.planner import Plan

        p_end = Plan.from_dict(plan).progress_at(plan["total_steps"])
        assert p_end == 1.0 and S.lr_at(p_end, base_lr=1.0, warmup=0.0, decay="linear") == 0.0
        lrs = [r["lr"] for r in _rows(branch)]
        assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < lrs[0] / len(lrs) * 1.5   # linear to 0
        t_lrs = [r["lr"] / r["batch"] ** 0.5 for r in _rows(trunk)]
        assert max(t_lrs[-3:]) == pytest.approx(min(t_lrs[-3:]))                 # the trunk stays constant
    rows = (out / "sweep.csv").read_text().splitlines()
    assert len(rows) == 3 and all(r.startswith("fastvit (wsd),") for r in rows[1:])
    seen = [json.loads((runs / n / "s0" / "results.json").read_text())["images_seen"]
            for n in ("wsd-trunk-5ep", "wsd-trunk-10ep", "10ep-wsd")]
    assert f",{sum(seen)}," in rows[2]                                           # the chain's images
    assert "15 epochs for independent runs of the same points (saving 27%)" in (out / "wsd.md").read_text()
