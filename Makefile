# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# `seqpack.ops` is shipped from ./ops (package-dir), so setuptools makes the editable install with a meta
# path finder and prints an information-only "Editable installation." note: silence exactly that note
EDITABLE := PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -e

.PHONY: setup demo test lint bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel first, so that seqpack's `torch>=2.4` is already met: pip never resolves a bare
	# `torch`, which would pull multi-GB CUDA builds
	$(BIN)/pip install -q torch==2.13.0

setup: $(BIN)/python
	$(EDITABLE) '.[test,bench,ray,plot]'

# the demo needs seqpack and matplotlib (it writes a stats plot), none of the test/bench/ray extras
demo: $(BIN)/python
	$(EDITABLE) '.[plot]'
	$(BIN)/python examples/demo.py

lint: setup
	$(BIN)/ruff check .

test: setup lint
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/packing.py
