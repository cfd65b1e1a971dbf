# Quickstart: `make demo` (set up, run the demo) and `make test` (set up, run the tests).
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch for this machine; on a GPU machine use e.g. TORCH_SPEC="torch>=2.3".
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test test-all bench clean

$(BIN)/capshape: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/capshape

demo: setup
	$(BIN)/capshape demo --out runs/demo

test: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: setup
	$(BIN)/python benchmarks/step_cost.py
	$(BIN)/python benchmarks/grad_engine.py --threads 1
	$(BIN)/python benchmarks/objective_overhead.py --threads 1
	$(BIN)/python benchmarks/accumulation.py --threads 1

clean:
	rm -rf $(VENV) runs
