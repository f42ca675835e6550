# Two entry points; each sets up what it needs on first use (see tools/bootstrap_env.sh).
# PYTHON=/path/to/python uses an existing environment (e.g. one with upstream detectron2) instead of .venv.
VENV ?= .venv
PY := $(if $(PYTHON),$(PYTHON),$(VENV)/bin/python)
export VENV PYTHON

.PHONY: env demo test bench
env:
	@bash tools/bootstrap_env.sh

demo: env
	$(PY) tools/demo.py $(DEMO_ARGS)

# The tests run in TEST_WORKERS processes (pytest-xdist), handed out test by test, except a group
# that shares an expensive fixture (xdist_group: the wheel build); default: one per CPU, at most 4.
# TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

test: env
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

bench: env
	$(PY) -m benchmarks.benchmark_frn
