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

test: env
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: env
	$(PY) -m benchmarks.benchmark_frn
