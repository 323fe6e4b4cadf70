# cmfast developer targets. Each creates .venv/ on first use and installs the package into it.
# The C++/CUDA extension (csrc/) is compiled against the venv's PyTorch, so torch is installed first and the package
# without build isolation; setup.py says why when it skips the extension (no compiler, CMFAST_SKIP_EXT=1).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXT_SOURCES := $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu)

.PHONY: demo test bench lint

$(BIN)/cmfast: setup.py pyproject.toml $(EXT_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet "torch>=2.4" ninja
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[test]"
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
