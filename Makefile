# Two commands on a fresh machine:
#   make demo   set up, make the example model, calibrate it, evaluate it, serve it and query it
#   make test   set up and run the test suite (what .ci/run calls)
PY := .venv/bin/python
ART := artifacts
SPARSITY ?= 0.5

.PHONY: setup demo test lint bench-calibration ref-tree
setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) examples/demo.py --workdir $(ART)/demo --sparsity $(SPARSITY)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -x -q --durations=15

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

# The tree of revision REV in artifacts/ref, for `scripts/gpu_e2e.sh ref artifacts/ref STAGE ...` on the GPU host
# (carry artifacts/ref): a change and its baseline measured in one device session.
ref-tree:
	@test -n "$(REV)" || { echo "usage: make ref-tree REV=<commit>"; exit 2; }
	rm -rf $(ART)/ref && mkdir -p $(ART)/ref && git archive "$(REV)" | tar -x -C $(ART)/ref
