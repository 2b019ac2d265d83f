# The two commands of the README. Each one works as the very first command on a fresh machine:
# it creates or reuses .venv/ and installs what is missing (scripts/setup_env.sh), then runs.
.PHONY: demo test setup clean-demo gpu-check

setup:
	@bash scripts/setup_env.sh

# Synthetic demo data -> fastvit-prep at 64,128,224 -> a short CPU training run -> quick benchmarks.
demo: setup
	@bash scripts/demo.sh

# The test suite: passes with no GPU (CUDA tests are skipped, Triton runs under TRITON_INTERPRET=1).
test: setup
	@.venv/bin/python -m pytest -q $(PYTEST_ARGS)

clean-demo:
	rm -rf demo_out runs/demo

# On a GPU machine (no network, nothing installed from it): matmul peak, kernel + model benchmarks at
# real sizes, every graph compiled once into one shared cache (beside the cuda/device_dependent tests),
# a 2.5-minute end-to-end run with GPU-busy per stage; every part time-boxed, < 8 min cold
# (docs/gpu-check.md).
# On a CPU machine the same parts at tiny sizes (CPU numbers). Uses .venv/bin/python when there is one,
# else python3; runs from the checkout (PYTHONPATH). JSON + logs go to $(OUT) (default bench/results/).
# GPU_CHECK_ARGS: more options for bench/gpu_check.py (e.g. --device cpu, --parts ..., --box PART=S).
OUT ?= bench/results/
PYTHON ?= $(shell [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
GPU_CHECK_ARGS ?=
gpu-check:
	@PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(PYTHON) bench/gpu_check.py --out "$(OUT)" $(GPU_CHECK_ARGS)
