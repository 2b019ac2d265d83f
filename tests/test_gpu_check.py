"""`make gpu-check` on a CPU machine: every part at tiny sizes, one JSON that says its numbers are CPU
numbers, logs; a part that times out is named and the others still run. And the checkout imports with
PYTHONPATH alone (what the GPU machine, with no network to install from, relies on)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path):
    env = dict(os.environ, FASTVIT_BENCH_SCRATCH=str(tmp_path / "scratch"), OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    # conftest sets TRITON_INTERPRET for this process's tests; the command runs as a user would run it
    # (with it, the CPU parts would run the Triton interpreter instead of the PyTorch references)
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.mark.slow
def test_make_gpu_check_runs_every_part_tiny_on_cpu(tmp_path):
    out = tmp_path / "out"
    if shutil.which("make"):
        cmd = ["make", "-s", "gpu-check", f"OUT={out}", f"PYTHON={sys.executable}"]
    else:
        cmd = [sys.executable, "bench/gpu_check.py", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [path] = out.glob("gpu-check-*.json")
    d = json.loads(path.read_text())
    gc = d["gpu_check"]
    assert gc["mode"] == "cpu-tiny" and gc["numbers"].startswith("cpu") and d["machine"]["gpu"] is None
    assert {k: v["status"] for k, v in gc["parts"].items()} == {p: "ok" for p in ("tests", "kernel", "model", "e2e")}
    assert d["failed"] == {} and "CPU" in gc["gpu_busy_method"]
    m = d["metrics"]
    assert m["tests/cuda_failed"] == 0 and m["tests/cuda_skipped"] > 0       # collected, skipped without a GPU
    assert "kernel/timm_ms@32,keep0.5" in m and "model_cpu_tiny/timm_eager_img_s@32,keep1.0" in m
    assert "model_cpu_tiny/fastvit_local_eager_img_s@32,keep0.5" in m
    for res in (32, 64):                                   # every curriculum stage: busy share and data wait
        assert 0 < m[f"e2e/cpu_op_busy@{res},keep1"] <= 1.05
        assert 0 <= m[f"e2e/data_wait_share@{res},keep1"] <= 1
    assert not any(k.startswith("e2e/gpu_busy@") for k in m)                 # no GPU numbers from a CPU
    e2e = gc["parts"]["e2e"]["info"]
    assert e2e["backend"] == "dali" and e2e["compile_s_by_shape"] and e2e["profile_windows"]
    for part in gc["parts"].values():
        assert (out / part["log"]).is_file()
    assert "backend auto -> dali on cpu" in (out / gc["parts"]["e2e"]["log"]).read_text()


@pytest.mark.slow
def test_a_part_past_its_time_box_is_named_and_the_rest_run(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(out), "--parts", "tests,kernel",
                           "--box", "tests=1"], cwd=REPO, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1
    d = json.loads(next(out.glob("gpu-check-*.json")).read_text())
    assert d["failed"] == {"tests": "timeout after 1 s"}
    assert d["gpu_check"]["parts"]["kernel"]["status"] == "ok" and "kernel/timm_ms@32,keep1" in d["metrics"]
    assert "FAILED: tests (timeout after 1 s)" in proc.stdout


def test_the_checkout_imports_with_pythonpath_alone(tmp_path):
    """No install: the editable install's finder removed, only the repo on sys.path."""
    script = (
        "import sys\n"
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "sys.path = [p for p in sys.path if 'site-packages' in p or 'lib/python' in p]\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "for m in [m for m in sys.modules if m.startswith('fastvit')]: del sys.modules[m]\n"
        "import fastvit.kernels, fastvit.data_prep, fastvit.data_prep.cli, fastvit.train.cli\n"
        "print(fastvit.kernels.__file__, fastvit.data_prep.__file__)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    k, d = proc.stdout.split()
    assert Path(k) == REPO / "kernels" / "__init__.py" and Path(d) == REPO / "data_prep" / "__init__.py"
