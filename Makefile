# Two commands on a fresh machine:
#   make demo   set up, make the example model, calibrate it, evaluate it, serve it and query it
#   make test   set up and run the test suite (what .ci/run calls)
PY := .venv/bin/python
ART := artifacts
SPARSITY ?= 0.5

.PHONY: setup demo test lint bench-calibration
setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) examples/demo.py --workdir $(ART)/demo --sparsity $(SPARSITY)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -x -q --durations=15

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
