"""The joint scaling law: it recovers known parameters from synthetic points, refuses points that cannot
determine it, leaves one budget out, chooses as a pure function, and scaling.json round-trips and rejects
malformed files with one line; the shipped priors load and say what data they were fitted on."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from fastvit import scaling
from fastvit.scaling import ScalingError, choose, fit_law, law_error, load_law, load_prior, save_law

TRUE = {"E": 0.15, "A": 8.0, "alpha": 0.35, "B": 6.0, "beta": 0.4}
SIZES = (5e5, 1e6, 2e6, 4e6, 8e6)
BUDGETS = {"1m": 3e3, "2m": 1e4, "4m": 3e4, "8m": 1e5}


def _points(params=TRUE, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return [{"shape": f"n{int(n)}", "params": n, "images": d, "budget": b, "seed": 0,
             "top1": 100 * (1 - float(law_error(params, n, d))) + noise * rng.normal()}
            for n in SIZES for b, d in BUDGETS.items()]


@pytest.fixture(scope="module")
def law():
    return fit_law(_points(), data={"name": "synthetic", "classes": 10, "resolution": 96}, provenance="test")


def test_recovers_known_parameters(law):
    for k, v in TRUE.items():
        assert law.params[k] == pytest.approx(v, rel=0.01), k
    assert law.fit_info["rmse_top1"] < 0.01
    assert law.loo["rmse"] < 0.05 and len(law.loo["refits"]) == len(BUDGETS)      # one refit per budget left out
    assert {b["budget"] for b in law.loo["by_budget"]} == set(BUDGETS)
    assert all(b["held"] == [] for b in law.loo["by_budget"])           # each refit fitted all five


def test_leave_one_budget_out_holds_what_the_other_budgets_cannot_determine():
    pts = [p for p in _points() if p["budget"] != "1m"]                    # 3 budgets: without one, 2 remain
    got = fit_law(pts)
    assert len(got.loo["refits"]) == 3
    assert all(b["held"] and set(b["held"]) <= {"B", "beta"} for b in got.loo["by_budget"])
    assert got.loo["rmse"] < 0.1


def test_recovers_another_law_with_one_exponent_fixed():
    other = {"E": 0.3, "A": 3.0, "alpha": 0.2, "B": 20.0, "beta": 0.6}
    got = fit_law(_points(other), fixed={"alpha": 0.2}, loo=False)
    assert got.fixed == ("alpha",) and got.params["alpha"] == 0.2
    for k in ("E", "A", "B", "beta"):
        assert got.params[k] == pytest.approx(other[k], rel=0.01), k


def test_noisy_points_still_forecast_within_noise():
    noisy = fit_law(_points(noise=0.3, seed=1))
    held = 100 * (1 - float(law_error(TRUE, 3e6, 5e4)))
    assert abs(noisy.predict(3e6, 5e4) - held) < 1.0
    lo, hi = noisy.interval(3e6, 5e4)
    assert lo <= noisy.predict(3e6, 5e4) <= hi and hi - lo > 0


def test_predict_interval_and_extrapolation(law):
    assert law.predict(1e6, 1e4) == pytest.approx(100 * (1 - float(law_error(TRUE, 1e6, 1e4))), abs=0.02)
    assert law.extrapolates(1e6, 1e4) is False
    far = law.extrapolates(2e7, 1e4)
    assert far == "N 2e+07 is 2.5x the largest fitted (8e+06)"
    both = law.extrapolates(1e5, 1e6)
    assert "N 1e+05 is 5.0x below the smallest fitted" in both and "D 1e+06 is 10.0x the largest" in both


@pytest.mark.parametrize("pts, fixed, msg", [
    ([{"params": 1e6, "images": d, "top1": 50 + i, "budget": str(i)} for i, d in enumerate((1e3, 1e4, 1e5, 1e6, 1e7, 1e8))],
     None, "one model size"),
    ([{"params": n, "images": 1e4, "top1": 50 + i} for i, n in enumerate((1e5, 1e6, 1e7, 1e8, 1e9, 1e10))],
     None, "about one number of images"),
    (_points()[:4], None, "needs at least 6 points, got 4"),
    ([p for p in _points() if p["params"] in (5e5, 1e6)], None, "2 distinct model sizes cannot determine alpha"),
    ([{"params": 1e6, "images": 1e4, "top1": 120.0}] * 6, None, "top1 in (0, 100)"),
    ([{"params": 1e6, "top1": 50}] * 6, None, "needs numbers params, images and top1"),
    (_points(), {"gamma": 1.0}, "unknown fixed parameter(s) gamma"),
])
def test_points_that_cannot_determine_the_law_are_refused(pts, fixed, msg):
    with pytest.raises(ScalingError, match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
        fit_law(pts, fixed=fixed)
    assert "\n" not in str(e.value)


def test_one_model_size_fits_when_its_terms_are_fixed():
    pts = [p for p in _points() if p["params"] == 1e6]
    got = fit_law(pts, fixed={"A": 8.0, "alpha": 0.35}, loo=False)
    assert got.params["beta"] == pytest.approx(0.4, rel=0.02)


def test_choose_is_pure_best_first_ties_to_fewer_params(law):
    cands = [{"shape": "big", "params": 8e6, "images": 1e4}, {"shape": "small", "params": 1e6, "images": 3e4},
             {"shape": "twin", "params": 2e6, "images": 3e4}, {"shape": "twin-small", "params": 2e6, "images": 3e4},
             {"shape": "slow", "params": 4e6, "images": 0}, {"shape": "huge", "params": 1e8, "images": 1e3}]
    before = copy.deepcopy(cands)
    rows = choose(law, cands)
    assert cands == before                                        # inputs untouched
    assert rows == choose(law, cands)                             # the same answer again
    tops = [r["top1"] for r in rows if r["top1"] is not None]
    assert tops == sorted(tops, reverse=True)
    assert rows[-1]["shape"] == "slow" and rows[-1]["top1"] is None
    assert "N 1e+08 is 12.5x the largest fitted" in next(r for r in rows if r["shape"] == "huge")["extrapolates"]
    for r in rows[:-1]:
        assert r["interval"][0] <= r["top1"] <= r["interval"][1]
    # equal predictions: the one with fewer parameters first, whatever the input order
    tie = [{"shape": "a", "params": 3e6, "images": 2e4}, {"shape": "b", "params": 2e6, "images": 2e4}]
    flat = scaling.ScalingLaw(**{**law.__dict__, "params": {**law.params, "A": 0.0}})
    assert [r["shape"] for r in choose(flat, tie)] == ["b", "a"]
    assert [r["shape"] for r in choose(flat, tie[::-1])] == ["b", "a"]


def test_save_load_round_trip(law, tmp_path):
    path = save_law(law, tmp_path / "scaling.json")
    back = load_law(path)
    assert back.params == pytest.approx(law.params) and back.n_range == law.n_range and back.d_range == law.d_range
    assert back.predict(2e6, 2e4) == pytest.approx(law.predict(2e6, 2e4))
    assert back.interval(2e6, 2e4) == pytest.approx(law.interval(2e6, 2e4))
    assert len(back.points) == len(law.points) and back.data == law.data
    assert json.loads(path.read_text())["form"] == scaling.FORM


@pytest.mark.parametrize("edit, msg", [
    (lambda d: "not json{", "not JSON"),
    (lambda d: {**d, "format": "other"}, "not a scaling law"),
    (lambda d: {**d, "version": 9}, "version 9 is not 1"),
    (lambda d: {**d, "params": {**d["params"], "alpha": "x"}}, "params: alpha must be a number"),
    (lambda d: {**d, "params": {k: v for k, v in d["params"].items() if k != "B"}}, "params: B must be a number"),
    (lambda d: {**d, "n_range": [5, 1]}, "n_range must be [smallest, largest]"),
    (lambda d: {**d, "data": {"classes": "ten"}}, "data.classes must be a positive integer"),
    (lambda d: {**d, "leave_one_budget_out": {"refits": [{"E": 1}]}}, "refits[0]: A must be a number"),
    (lambda d: [1, 2], "not a JSON object"),
])
def test_load_rejects_a_malformed_file_with_one_line(law, tmp_path, edit, msg):
    good = json.loads(save_law(law, tmp_path / "good.json").read_text())
    bad = edit(good)
    path = tmp_path / "bad.json"
    path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(ScalingError) as e:
        load_law(path)
    assert msg in str(e.value) and "\n" not in str(e.value) and str(path) in str(e.value)


def test_load_missing_file_is_one_line(tmp_path):
    with pytest.raises(ScalingError, match="No such file"):
        load_law(tmp_path / "none.json")


def test_other_data_or_resolution_is_one_warning_line(law):
    assert law.mismatch(10, 96) is None
    w = law.mismatch(1000, 224)
    assert w.startswith("warning:") and "10 classes (this run: 1000)" in w and "96 px (this run: 224)" in w
    assert "\n" not in w
    assert "96 px" in law.mismatch(10, 128) and "classes" not in law.mismatch(10, 128)


@pytest.mark.parametrize("name, classes", [("cpu", 10), ("gpu", 1000)])
def test_shipped_priors_load_with_provenance(name, classes):
    prior = load_prior(name)
    assert prior.data["classes"] == classes and prior.provenance
    assert len(prior.points) >= 6 and all(p.get("source") for p in prior.points)
    assert prior.loo["rmse"] is not None
    # more images never hurt a fixed model, and the law reproduces its own points: within 2 top-1 points for
    # the median point (the worst are the tiny-image 2-minute nets of the search study, 6.5 points off)
    n = prior.n_range[0]
    assert prior.predict(n, prior.d_range[1]) > prior.predict(n, prior.d_range[0])
    resid = sorted(abs(prior.predict(p["params"], p["images"]) - p["top1"]) for p in prior.points)
    assert resid[len(resid) // 2] < 2.0 and resid[-1] < 8.0


def test_the_cpu_prior_forecasts_growth_and_the_gpu_prior_does_not():
    """cpu: a growth term fitted on the growth study's --growth manual runs, each from its file, reproducing them
    within 2 points; gpu: none read, so no growing candidate is forecast there."""
    cpu, gpu = load_prior("cpu"), load_prior("gpu")
    g = cpu.growth
    assert 0.0 <= g["c"] <= 2.0 and g["provenance"] and len(g["points"]) >= 4
    assert all(p["source"].startswith("bench/results/growth/") and 0 < sum(p["images_shallow"].values()) < p["images"]
               for p in g["points"])
    assert all(abs(cpu.predict(p["params"], cpu.effective_images(p["images"], p["images_shallow"], p["depth"]))
                   - p["top1"]) < 2.0 for p in g["points"])
    assert not gpu.growth


def test_unknown_prior_names_the_known_ones():
    with pytest.raises(ScalingError, match="no shipped scaling prior 'tpu'; known: cpu, gpu"):
        load_prior("tpu")


# ------------------------------------------------------------------------------------------------------
# the growth term: an image seen at depth k of a run growing to L counts 1 - c*(1/k - 1/L)

def _grown(c, params=TRUE, share=0.6):
    """Growing runs 1 -> 2 and 2 -> 4: a share of each run's images seen shallow, top-1 the law's at D_eff."""
    out = []
    for n, (k, depth) in zip(SIZES[1:4], ((1, 2), (2, 4), (1, 2))):
        for b, d in BUDGETS.items():
            d_eff = d - share * d + max(0.0, min(1.0, 1 - c * (1 / k - 1 / depth))) * share * d
            out.append({"shape": f"n{int(n)}+grow", "params": n, "images": d, "depth": depth,
                        "images_shallow": {k: share * d}, "budget": b,
                        "top1": 100 * (1 - float(law_error(params, n, d_eff)))})
    return out


@pytest.mark.parametrize("c", [0.0, 0.5, 1.0, 1.5])
def test_growth_term_recovers_a_known_c(law, c):
    grown = scaling.fit_growth(law, _grown(c), provenance="synthetic")
    assert grown.growth["c"] == pytest.approx(c, abs=0.01)
    assert grown.params == law.params                         # the law itself is not refitted
    assert len(grown.growth["loo"]["cs"]) == len(BUDGETS)
    assert grown.growth["loo"]["rmse"] < 0.05
    # a growing candidate is forecast as the fixed model at D_eff; a deeper shallow phase is worth more
    d, early = 5e4, 3e4
    rows = {r["shape"]: r for r in choose(grown, [
        {"shape": "1>2", "params": 2e6, "images": d, "depth": 2, "images_shallow": {1: early}},
        {"shape": "6>12", "params": 2e6, "images": d, "depth": 12, "images_shallow": {6: early}}])}
    for name, k, depth in (("1>2", 1, 2), ("6>12", 6, 12)):
        d_eff = d - early + scaling.credit(k, depth, grown.growth["c"]) * early
        assert rows[name]["images_effective"] == round(d_eff)
        assert rows[name]["top1"] == pytest.approx(law.predict(2e6, d_eff))
        assert rows[name]["interval"][0] <= rows[name]["top1"] <= rows[name]["interval"][1]
    assert c == 0 or rows["6>12"]["top1"] > rows["1>2"]["top1"]


def test_credit_is_one_at_the_final_depth_and_clipped():
    assert scaling.credit(4, 4, 1.7) == 1.0 and scaling.credit(1, 2, 0.0) == 1.0
    assert scaling.credit(1, 2, 1.0) == 0.5 and scaling.credit(2, 4, 1.0) == 0.75
    assert scaling.credit(1, 12, 2.0) == 0.0                   # never below nothing


def test_growth_pays_only_where_its_effective_images_beat_the_fixed_shapes(law):
    """The same candidates: growth is the pick at c 0 (free speed); at c 2 (a depth-1 image of 4 counts 0) the
    fixed final shape, which sees more images at full depth, is."""
    cands = [{"shape": "d4+grow", "params": 4e6, "images": 6e4, "depth": 4, "images_shallow": {1: 4e4}},
             {"shape": "d2", "params": 1e6, "images": 6e4},
             {"shape": "d4", "params": 4e6, "images": 3e4}]
    for c, pick in ((0.0, "d4+grow"), (2.0, "d4")):
        grown = scaling.fit_growth(law, _grown(c))
        assert choose(grown, cands)[0]["shape"] == pick


def test_a_law_without_growth_term_forecasts_no_growing_candidate(law):
    rows = choose(law, [{"shape": "g", "params": 8e6, "images": 1e9, "depth": 4, "images_shallow": {2: 5e8}},
                        {"shape": "f", "params": 5e5, "images": 1e3}])
    assert [r["shape"] for r in rows] == ["f", "g"]
    assert rows[1]["top1"] is None and "no growth term" in rows[1]["extrapolates"]
    with pytest.raises(ScalingError, match="no growth term"):
        law.effective_images(1e5, {2: 5e4}, 4)
    assert law.effective_images(1e5, {}, 4) == 1e5


def test_growth_term_refuses_runs_that_did_not_grow(law):
    bad = _grown(0.5)
    with pytest.raises(ScalingError, match="did not grow"):
        scaling.fit_growth(law, [{**bad[0], "images_shallow": {1: 0}}])
    with pytest.raises(ScalingError, match="did not grow"):
        scaling.fit_growth(law, [{**bad[0], "images_shallow": {2: 10}}])            # depth 2 of 2 is not shallow
    with pytest.raises(ScalingError, match="images_shallow"):
        scaling.fit_growth(law, [{k: v for k, v in bad[1].items() if k != "images_shallow"}])


def test_growth_term_round_trips_and_a_bad_c_is_one_line(law, tmp_path):
    grown = scaling.fit_growth(law, _grown(0.5))
    back = load_law(save_law(grown, tmp_path / "g.json"))
    assert back.growth["c"] == pytest.approx(grown.growth["c"])
    assert back.predict(1e6, back.effective_images(6e4, {"2": 3e4}, 4)) == pytest.approx(
        grown.predict(1e6, grown.effective_images(6e4, {2: 3e4}, 4)), rel=1e-9)
    assert "growth" not in scaling.law_to_dict(law)                       # no term, no key
    d = scaling.law_to_dict(grown)
    d["growth"]["loo"] = None                                              # a term without its refits
    (tmp_path / "noloo.json").write_text(json.dumps(d, default=float))
    bare = load_law(tmp_path / "noloo.json")
    assert bare.grown_interval(1e6, 6e4, {2: 3e4}, 4)[0] <= bare.predict(1e6, bare.effective_images(6e4, {2: 3e4}, 4))
    d["growth"]["c"] = 2.7
    (tmp_path / "bad.json").write_text(json.dumps(d, default=float))
    with pytest.raises(ScalingError, match=r"growth c must be in \[0, 2\]"):
        load_law(tmp_path / "bad.json")
