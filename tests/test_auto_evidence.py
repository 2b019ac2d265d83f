"""bench/auto_evidence.py: issue 22's leave-one-budget-out picks, regret and auto-vs-preset from a sweep's
results.json files (a synthetic sweep whose top-1 follows a known law)."""
import csv
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import auto_evidence  # noqa: E402

from fastvit.models.shapes import param_count  # noqa: E402
from fastvit.scaling import law_error, load_prior  # noqa: E402

BUDGETS = [("4m", 240.0), ("8m", 480.0), ("16m", 960.0)]
RATE = {"d1-w192": 300.0, "d2-w128": 400.0, "d2-w192": 150.0, "d4-w192": 80.0}    # images per counted second


def _law():
    return {"E": 0.05, "A": 3.0e4, "alpha": load_prior("gpu").params["alpha"], "B": 3.0, "beta": 0.2}


def _top1(shape, images, seed):
    n = param_count(shape, 10)
    return 100.0 * (1 - float(law_error(_law(), n, images))) + (0.1 if seed else -0.1)


def _sweep(tmp_path: Path, auto_shape="d2-w128", auto_shift=0.0) -> Path:
    sweep = tmp_path / "sweep"
    rows = []

    def run(variant, budget, secs, seed, shape, extra=None):
        d = sweep / "runs" / variant.replace("+", "_") / budget / f"s{seed}"
        d.mkdir(parents=True)
        images = int(RATE[shape] * secs * (1.01 if seed else 0.99))
        top1 = _top1(shape, images, seed)
        res = {"top1": top1, "counted_s": secs, "steps": images // 64, "images_seen": images, **(extra or {})}
        if extra:
            res["top1"] += auto_shift
        (d / "results.json").write_text(json.dumps(res))
        (d / "plan.json").write_text("{}")
        rows.append({"variant": variant, "budget": budget, "budget_s": secs, "seed": seed, "top1": res["top1"],
                     "images_seen": images, "run_dir": str(d)})

    for budget, secs in BUDGETS:
        for seed in (0, 1):
            for shape in RATE:
                run(f"fastvit+shape={shape}", budget, secs, seed, shape)
            pick = {"shape": auto_shape, "params": param_count(auto_shape, 10)}
            cand_rows = [{"shape": s, "images": int(RATE[s] * secs / 2), "speed_from": "flops", "top1": 50.0}
                    for s in RATE]                       # a speed model that halves every shape's images
            run(auto_evidence.AUTO_VARIANT, budget, secs, seed, auto_shape,
                {"model_auto": {"pick": pick, "rows": cand_rows}, "predicted_top1": {"top1": 70.0, "interval": [69, 71]}})
    with open(sweep / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return sweep


def _true_best(secs):
    return max(RATE, key=lambda s: _top1(s, RATE[s] * secs, 0))


def test_lobo_recovers_the_best_shape_and_zero_regret(tmp_path):
    ev = auto_evidence.evidence(_sweep(tmp_path), "d4-w192", 10)
    assert [r["budget"] for r in ev["lobo"]] == ["4m", "8m", "16m"]
    assert [r["budget"] for r in ev["lobo_free"]] == ["4m", "8m", "16m"]
    for r in ev["lobo"] + ev["lobo_free"]:
        assert "refused" not in r
        assert r["budget"] not in r["fitted_on"]                 # the held-out budget is not in the fit
        assert r["pick"] == r["best"] == _true_best(r["budget_s"])
        assert r["regret"] == pytest.approx(0.0, abs=1e-9)
        assert abs(r["forecast_error"]) < 0.5                     # the law is the truth up to the seed jitter
        assert r["ranking"][0]["shape"] == r["pick"]


def test_auto_against_the_preset(tmp_path):
    ev = auto_evidence.evidence(_sweep(tmp_path, auto_shift=-50.0), "d4-w192", 10)
    rows = ev["auto_vs_preset"]
    assert [r["budget"] for r in rows] == ["4m", "8m", "16m"]
    for r in rows:
        assert r["auto_picks"] == ["d2-w128", "d2-w128"]
        assert r["margin"] == pytest.approx(r["auto_top1"] - r["preset_top1"])
        assert r["auto_at_least_preset"] is False               # 50 points below the grid's own d2-w128
    ok = auto_evidence.evidence(_sweep(tmp_path / "b"), "d4-w192", 10)["auto_vs_preset"]
    assert all(r["auto_at_least_preset"] for r in ok)
    check = ev["speed_check"]
    assert len(check) == 3 * 2 * len(RATE)                   # budgets x seeds x candidates in the grid
    assert all(r["ratio"] == pytest.approx(0.5, abs=0.01) for r in check)


def test_cli_writes_the_table_and_copies_every_run(tmp_path, capsys):
    sweep = _sweep(tmp_path)
    out = tmp_path / "out"
    assert auto_evidence.main(["--sweep", str(sweep), "--out", str(out)]) == 0
    ev = json.loads((out / "evidence.json").read_text())
    assert len(ev["runs"]) == 3 * 2 * (len(RATE) + 1)
    assert all(not Path(r["run_dir"]).is_absolute() for r in ev["runs"])
    assert all((out / r["run_dir"] / "results.json").is_file() and (out / r["run_dir"] / "plan.json").is_file()
               for r in ev["runs"])
    table = (out / "table.md").read_text()
    assert "Leave-one-budget-out" in table and "d4-w192 (the `cpu` preset)" in table


def test_cli_refuses_a_dir_without_a_sweep(tmp_path, capsys):
    assert auto_evidence.main(["--sweep", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no sweep.csv" in capsys.readouterr().err


# growth as a candidate: a second sweep of grown runs (d4-w192 grown 2 -> 4, faster than fixed d4-w192, 70% of its
# images at depth 2) whose top-1 follows the law at D_eff = D_4 + credit(2, 4, c) * D_2
GROWN_RATE, SHALLOW = 200.0, 0.7


def _growth_sweep(tmp_path: Path, c: float, grown_rate: float = GROWN_RATE) -> Path:
    from fastvit.scaling import credit

    sweep = tmp_path / "growth"
    rows = []
    for budget, secs in BUDGETS:
        for seed in (0, 1):
            for variant, shape, rate in (("fastvit+shape=d4-w192+growth=manual", "d4-w192", grown_rate),
                                         ("fastvit+shape=d2-w128", "d2-w128", RATE["d2-w128"])):
                d = sweep / "runs" / variant.replace("+", "_") / budget / f"s{seed}"
                d.mkdir(parents=True)
                images = int(rate * secs)
                res = {"counted_s": secs, "steps": images // 64, "images_seen": images}
                if "growth" in variant:
                    early = int(SHALLOW * images)
                    res["stages"] = [{"steps": early, "batch_size": 1, "depth": 2},
                                     {"steps": images - early, "batch_size": 1, "depth": 4}]
                    images_law = images - early + credit(2, 4, c) * early
                else:
                    images_law = images
                res["top1"] = _top1(shape, images_law, seed)
                (d / "results.json").write_text(json.dumps(res))
                rows.append({"variant": variant, "budget": budget, "budget_s": secs, "seed": seed,
                             "top1": res["top1"], "images_seen": images, "run_dir": str(d)})
    with open(sweep / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return sweep


@pytest.mark.parametrize("c, rate, grown_wins", [(0.0, GROWN_RATE, False), (2.0, GROWN_RATE, False),
                                                 (0.0, 1.2 * RATE["d2-w128"], True)])
def test_growth_joins_the_candidates_where_the_law_has_its_term(tmp_path, c, rate, grown_wins):
    from fastvit.scaling import credit

    ev = auto_evidence.evidence(_sweep(tmp_path), "d4-w192", 10, _growth_sweep(tmp_path, c, rate))
    worth = credit(2, 4, c)
    # growth fast enough and its shallow images worth full ones: the grown shape is the pick at every budget
    assert all((r["pick"] == "d4-w192+grow") == grown_wins for r in ev["lobo_grow"])
    assert all("c" not in r for r in ev["lobo"] + ev["lobo_free"])        # the fixed-shape checks stay as they were
    for r in ev["lobo_grow"]:
        assert credit(2, 4, r["c"]) == pytest.approx(worth, abs=0.1)       # c fitted on the other budgets' grown runs
        assert "d4-w192+grow" in [x["shape"] for x in r["ranking"]]
        assert r["regret"] < 0.25                                          # the seeds' jitter is ±0.1
        grown_true = _top1("d4-w192", rate * r["budget_s"] * (1 - SHALLOW + worth * SHALLOW), 0)
        fixed_true = max(_top1(s, RATE[s] * r["budget_s"], 0) for s in RATE)
        if abs(grown_true - fixed_true) > 0.3:                             # clear cases: the pick is the better one
            assert (r["pick"] == "d4-w192+grow") == (grown_true > fixed_true)
    assert c == 0.0 or all(r["pick"] != "d4-w192+grow" for r in ev["lobo_grow"])
    # one credit for all: one growth schedule here, so the same credit as the term's
    for r in ev["lobo_const"]:
        assert r["credit"] == pytest.approx(worth, abs=0.1) and r["regret"] < 0.25
    rows = ev["growth"]
    assert [r["budget"] for r in rows] == ["4m", "8m", "16m"]
    for r in rows:
        assert r["shallow_share"] == pytest.approx(SHALLOW, abs=0.01) and set(r["controls"]) == {"d2-w128"}
        assert r["vs_grid_best"] == pytest.approx(r["top1"] - r["grid_best_top1"])
        assert r["grid_fixed_top1"] is not None and r["prior_forecast"] is not None
        assert all(x == pytest.approx(worth, abs=0.08) for x in r["run_credits"])     # seed jitter ±0.1 point


def test_cli_with_a_growth_sweep_copies_its_runs_apart(tmp_path):
    out = tmp_path / "out"
    assert auto_evidence.main(["--sweep", str(_sweep(tmp_path)), "--out", str(out),
                               "--growth-sweep", str(_growth_sweep(tmp_path, 1.0))]) == 0
    ev = json.loads((out / "evidence.json").read_text())
    grown = [r for r in ev["runs"] if r.get("sweep") == "growth"]
    assert len(grown) == 3 * 2 * 2 and all(r["run_dir"].startswith("growth/runs/") for r in grown)
    assert all((out / r["run_dir"] / "results.json").is_file() for r in ev["runs"])
    table = (out / "table.md").read_text()
    assert "Growing runs (`--growth manual`) against the fixed shapes" in table and "same-batch d2-w128" in table
