# Two commands on a fresh machine: `make demo` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast test-slow lint bench demo-model sample-data clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

## The bundled sample case + demo model through the real pipeline; outputs in ./ipmn-demo/
demo: venv
	$(BIN)/ipmn demo --out ipmn-demo

## Lint + the whole test suite (slow tests included; see `make test-fast`)
test: venv lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: venv lint
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: venv
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check IPMNClassifier IPMNTrainer Testing

bench: venv
	$(BIN)/python Testing/Benchmarks/run_all.py

clean:
	rm -rf ipmn-demo .pytest_cache
