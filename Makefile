# Two commands on a fresh machine (Python 3.11+ and a C compiler):
#   make sim    set up, then run the whole pipeline on the simulated bus
#   make test   set up, then run the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup sim test lint bench

setup:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'

sim: setup
	$(BIN)/cngmrv sim

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy agent drivers native sim

bench: setup
	$(BIN)/python bench/integrator.py
	$(BIN)/python bench/store.py
