"""bench/throughput.py framework: argument checks, JSON layout, skipped and failing sections."""
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"


@pytest.fixture()
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("fastvit_bench_throughput", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # puts bench/ on sys.path, imports bench/sections
    return mod


def _fake_section(monkeypatch, name, run):
    m = types.ModuleType(f"sections.{name}")
    m.run = run
    monkeypatch.setitem(sys.modules, f"sections.{name}", m)


def test_json_has_machine_metrics_and_skips(bench, monkeypatch, tmp_path):
    from sections import SectionSkipped

    def prep(ctx):
        ctx.skip("prep/gpu_thing", "needs CUDA")
        return {"prep/a_over_b@64": 2.5}

    def loader(ctx):
        raise SectionSkipped("no data here")

    _fake_section(monkeypatch, "prep", prep)
    _fake_section(monkeypatch, "loader", loader)
    out = tmp_path / "r.json"
    assert bench.main(["--section", "prep,loader", "--quick", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["metrics"] == {"prep/a_over_b@64": 2.5}
    assert res["skipped"] == {"prep/gpu_thing": "needs CUDA", "loader": "no data here"}
    m = res["machine"]
    assert m["cores"] >= 1 and "cpu" in m and "gpu" in m
    assert {"torch", "timm", "ffcv", "nvidia.dali"} <= set(m["versions"])


def test_failing_section_reported_not_hidden(bench, monkeypatch, tmp_path, capsys):
    def boom(ctx):
        raise RuntimeError("kaput")

    _fake_section(monkeypatch, "kernel", boom)
    _fake_section(monkeypatch, "model", lambda ctx: {"model/x": 1.0})
    out = tmp_path / "r.json"
    assert bench.main(["--section", "kernel,model", "--json", str(out)]) == 1
    res = json.loads(out.read_text())
    assert res["metrics"] == {"model/x": 1.0}
    assert "kaput" in res["failed"]["kernel"]


def test_usage_errors_exit_2(bench, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--section", "nope"])
    assert e.value.code == 2
    assert bench.main(["--data", "/definitely/not/here"]) == 2
    assert "does not exist" in capsys.readouterr().err
