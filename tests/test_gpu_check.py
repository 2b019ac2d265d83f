"""`make gpu-check` on a CPU machine (forced with --device cpu, so a GPU machine runs the same checks):
every part at tiny sizes, one JSON that says its numbers are CPU numbers and names every target with the
reason it is null here, logs; with matplotlib and psutil unimportable; the compile cache shared across
processes; a part that times out is named and the others still run. And the checkout imports with
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
WITHOUT_OPTIONAL = Path(__file__).resolve().parent / "fixtures" / "without_optional"
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402


def _env(tmp_path, hide_optional=False):
    env = dict(os.environ, FASTVIT_BENCH_SCRATCH=str(tmp_path / "scratch"), OMP_NUM_THREADS="1")
    for k in ("OUT", "FASTVIT_COMPILE_CACHE", "FASTVIT_PEAK_TFLOPS"):
        env.pop(k, None)
    # the command runs as a user would run it: conftest's TRITON_INTERPRET is not passed on (the tests
    # part's pytest sets its own; the CPU bench parts run the PyTorch references)
    env.pop("TRITON_INTERPRET", None)
    if hide_optional:       # matplotlib and psutil unimportable, as on a machine without them
        env["PYTHONPATH"] = os.pathsep.join([str(WITHOUT_OPTIONAL)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


@pytest.mark.slow
def test_make_gpu_check_runs_every_part_tiny_on_cpu_without_matplotlib_and_psutil(tmp_path):
    out = tmp_path / "out"
    if shutil.which("make"):
        cmd = ["make", "-s", "gpu-check", f"OUT={out}", f"PYTHON={sys.executable}", "GPU_CHECK_ARGS=--device cpu"]
    else:
        cmd = [sys.executable, "bench/gpu_check.py", "--out", str(out), "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path, hide_optional=True), capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "optional matplotlib is not installed" in proc.stdout and "optional psutil is not installed" in proc.stdout
    [path] = out.glob("gpu-check-*.json")
    d = json.loads(path.read_text())
    gc = d["gpu_check"]
    assert gc["mode"] == "cpu-tiny" and gc["complete"] and gc["numbers"].startswith("cpu")
    assert gc["packages"]["matplotlib"] is False and gc["packages"]["psutil"] is False
    assert {k: v["status"] for k, v in gc["parts"].items()} == {p: "ok" for p in gpu_check.PARTS}
    assert d["failed"] == {} and "CPU" in gc["gpu_busy_method"]
    # every named target is in the JSON: null here, with the reason
    assert set(d["named_targets"]) == set(gpu_check.NAMED)
    for key, t in d["named_targets"].items():
        assert t["value"] is None and t["why"].startswith("cpu-tiny run"), key
    m = d["metrics"]
    assert m["peak_cpu/fp32_matmul_gflops"] > 0
    # tests part: cuda tests collected and skipped, device-dependent ones run on their CPU path
    assert m["tests/failed"] == 0 and m["tests/error"] == 0 and m["tests/skipped"] > 0 and m["tests/passed"] > 0
    # one compile cache for every process: the second fresh process loads the graph the first compiled
    first, again = "tiny@32,keep1.0:first", "tiny@32,keep1.0:again"
    assert m[f"compile/fxgraph_cache_miss@{first}"] > 0 and m[f"compile/fxgraph_cache_hit@{again}"] > 0
    assert m[f"compile/fxgraph_cache_miss@{again}"] == 0
    assert gc["compile_cache"]["was_empty"] and gc["compile_cache"]["dir"].startswith(str(tmp_path))
    assert "kernel/timm_ms@32,keep0.5" in m and "model_cpu_tiny/timm_eager_img_s@32,keep1.0" in m
    assert "model_cpu_tiny/fastvit_local_eager_img_s@32,keep0.5" in m
    assert "kernel_cpu_tiny/locality_mlp_keep0.5_over_keep1.0" in m
    for res in (32, 64):                                   # every curriculum stage: busy share and data wait
        assert 0 < m[f"e2e/cpu_op_busy@{res},keep1"] <= 1.05
        assert 0 <= m[f"e2e/data_wait_share@{res},keep1"] <= 1
    assert m["e2e/switch_wait_over_median_step"] >= 0 and m["e2e/median_step_s"] > 0
    assert not any(k.startswith("e2e/gpu_busy@") for k in m)                 # no GPU numbers from a CPU
    e2e = gc["parts"]["e2e"]["info"]
    assert e2e["backend"] == "dali" and e2e["compile_s_by_shape"] and e2e["profile_windows"]
    assert e2e["budget"]["compile_counted_in_training_window"] is False
    for part in gc["parts"].values():
        assert (out / part["log"]).is_file()
    e2e_log = (out / gc["parts"]["e2e"]["log"]).read_text()
    assert "backend auto -> dali on cpu" in e2e_log
    assert "curves.png skipped: matplotlib is not installed" in e2e_log
    assert "USDT" not in e2e_log and "profiler_start" not in e2e_log          # quiet profiler windows


@pytest.mark.slow
def test_a_part_past_its_time_box_is_named_and_the_rest_run(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(out), "--device", "cpu",
                           "--parts", "tests,kernel", "--box", "tests=1"], cwd=REPO, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    d = json.loads(next(out.glob("gpu-check-*.json")).read_text())
    assert d["failed"] == {"tests": "timeout after 1 s"}
    assert d["gpu_check"]["parts"]["kernel"]["status"] == "ok" and "kernel/timm_ms@32,keep1" in d["metrics"]
    assert "FAILED: tests (timeout after 1 s)" in proc.stdout


def test_start_up_check_names_each_missing_package_once_per_part(tmp_path):
    script = ("import sys\n"
              f"sys.path.insert(0, {str(REPO / 'bench')!r})\n"
              "import gpu_check\n"
              "gpu_check.REQUIRES['model'] = gpu_check.REQUIRES['model'] + ['no_such_pkg_xyz']\n"
              "gpu_check.REQUIRES['e2e'] = gpu_check.REQUIRES['e2e'] + [('no_such_a', 'no_such_b')]\n"
              "cannot, seen, lines = gpu_check.check_packages(list(gpu_check.PARTS), False)\n"
              "print(sorted(cannot)); print(seen['psutil'], seen['matplotlib'])\n"
              "print('\\n'.join(lines))\n")
    proc = subprocess.run([sys.executable, "-c", script], env=_env(tmp_path, hide_optional=True), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "['e2e', 'model']" and lines[1] == "False False"
    assert "gpu_check: part model needs no_such_pkg_xyz, not installed here: skipped" in lines
    assert "gpu_check: part e2e needs no_such_a or no_such_b, not installed here: skipped" in lines
    assert sum(ln.startswith("gpu_check: optional matplotlib") for ln in lines) == 1
    assert sum(ln.startswith("gpu_check: optional psutil") for ln in lines) == 1


def test_named_targets_say_why_a_gpu_number_is_missing():
    parts = {"peak": {"status": "ok"}, "model": {"status": "failed", "why": "timeout after 75 s"}}
    metrics = {"peak/bf16_matmul_tflops": 801.0}
    skipped = {"kernel/fused_*@224,keep1": "the fused Triton kernel needs a CUDA GPU"}
    t = gpu_check.named_targets(metrics, skipped, parts, gpu=True)
    assert set(t) == set(gpu_check.NAMED) and t["peak/bf16_matmul_tflops"]["value"] == 801.0
    assert t["peak/bf16_matmul_tflops"]["why"] is None
    assert t["model/fastvit_over_timm_compiled@224,keep0.5"]["why"].startswith("part model failed: timeout after 75 s")
    assert t["kernel/fused_over_timm@224,keep1"]["why"] == "the fused Triton kernel needs a CUDA GPU"
    assert t["e2e/gpu_busy@64,keep1"]["why"] == "part e2e did not run"
    cpu = gpu_check.named_targets(metrics, skipped, parts, gpu=False)
    assert cpu["peak/bf16_matmul_tflops"]["value"] is None                 # a CPU run fills no target


def test_gpu_boxes_fit_the_window_cold():
    """The parts run one after another except `tests`, which runs beside `compile`."""
    b = gpu_check.GPU_BOX
    wall = sum(v for k, v in b.items() if k not in gpu_check.BESIDE) + max(
        0, max(b[k] for k in gpu_check.BESIDE) - max(b[h] for h in gpu_check.BESIDE.values()))
    assert wall <= gpu_check.TOTAL_S <= 480
    assert set(b) == set(gpu_check.PARTS) == set(gpu_check.CPU_BOX)
    # the e2e trainer's budget: the training window plus the allowance for its (cached) compile + probe
    assert gpu_check.GPU_OPTS["e2e"]["train"]["minutes"] * 60 == gpu_check.E2E_WINDOW_S + gpu_check.E2E_ALLOWANCE_S
    assert gpu_check.E2E_WINDOW_S + gpu_check.E2E_ALLOWANCE_S < b["e2e"]
    # the model part times the e2e stage shapes (and keep 0.5), which the compile part compiles first
    jobs = {(j["res"], j["keep"], j["batch"]) for j in gpu_check.GPU_OPTS["compile"]["jobs"]
            if j["kind"] == "fastvit" and not j.get("mode")}
    assert jobs == set(gpu_check.GPU_SHAPES) == {tuple(s) for s in gpu_check.GPU_OPTS["model"]["settings"]}


def test_mfu_peak_per_gpu():
    from fastvit.sysinfo import peak_flops, spec_tflops

    assert peak_flops("NVIDIA H200") == 790e12                            # measured on an H200 (issue 16)
    assert peak_flops("NVIDIA H100 80GB HBM3") == spec_tflops("NVIDIA H100 80GB HBM3") * 1e12 == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("cpu: AMD EPYC") is None


def test_switch_wait_is_over_the_median_step_of_the_run():
    from sections.e2e import switch_wait

    def row(stage, res, wait, s=1.0, images=80, batch=8, **kw):
        return {"kind": "train", "stage": stage, "res": res, "keep": 1.0, "batch": batch, "interval_s": s,
                "interval_wait_s": wait, "interval_images": images, **kw}

    rows = [row(0, 64, 0.5), row(0, 64, 0.01), row(0, 64, 0.01, s=2.0),             # 0.1, 0.2 s a step
            row(1, 128, 0.6), row(1, 128, 0.0, s=3.0, images=40, batch=4),            # 0.3 s a step
            {"kind": "profile", "res": 128}]
    out = switch_wait(rows)
    assert out["e2e/median_step_s"] == pytest.approx(0.2) and out["e2e/switch_wait_s"] == pytest.approx(0.6)
    assert out["e2e/switch_wait_over_median_step"] == pytest.approx(3.0) and out["e2e/switch_wait_exact"] == 0.0
    rows[3]["interval_max_wait_s"] = 0.3                                             # exact when logged
    assert switch_wait(rows)["e2e/switch_wait_over_median_step"] == pytest.approx(1.5)
    assert switch_wait(rows[:3]) == {}                                              # no switch: no number


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
