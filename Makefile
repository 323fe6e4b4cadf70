# cmfast developer targets. Each creates .venv/ on first use and installs the package into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench lint

$(BIN)/cmfast: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(BIN)/cmfast

demo: $(BIN)/cmfast  # replaces demo/ from an earlier run
	rm -rf demo
	$(BIN)/cmfast demo --out demo

test: $(BIN)/cmfast
	$(BIN)/python -m pytest -q tests

bench: $(BIN)/cmfast
	$(BIN)/python -m pytest -q bench --benchmark-only --benchmark-json=bench/results/cpu-latest.json

lint: $(BIN)/cmfast
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
