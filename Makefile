# The two commands of the README. Each one works as the very first command on a fresh machine:
# it creates or reuses .venv/ and installs what is missing (scripts/setup_env.sh), then runs.
.PHONY: demo test setup clean-demo

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
