# liver-fcn: the two commands of the README, and their set-up.
#   make demo   set up .venv, write phantom patients, prepare them, train FCN-8s on the CPU (~6 min)
#   make test   set up .venv, check the code style (make lint) and run the test suite
#   make bench  print inference speed and memory (the bundle against a naive MONAI pipeline) and training speed (s/slice)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed before the project so that pip keeps this build instead of resolving its own
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# the test suite runs in this many pytest-xdist workers, each with its share of the cores
TEST_WORKERS ?= 2

.PHONY: setup demo lint test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

setup: $(BIN)/.installed

demo: setup
	PATH="$(abspath $(BIN)):$$PATH" bash workflows/demo.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pretty-format-json --indent 4 --no-sort-keys bundle/configs/*.json

test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

bench: setup
	$(BIN)/python benchmarks/inference_speed.py
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf $(VENV) data/phantoms bundle/models bundle/eval .pytest_cache
