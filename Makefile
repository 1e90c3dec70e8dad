# The two commands of the README: `make demo` and `make test`. Each creates .venv when it is
# missing and installs the package with pip. TORCH picks the PyTorch build; torch==2.13.0 is a
# CPU build (a plain `torch` pulls a CUDA build of several GB). If that exact release cannot be
# had, the install falls back to whatever `torch` pip resolves.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fesmia-installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fesmia-hooks demo

lint: $(STAMP)
	$(PY) -m ruff check fesmia_hooks integrations tests examples benchmarks

test: $(STAMP) lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info

.PHONY: bench bench-quick

bench: $(STAMP)
	$(PY) benchmarks/run.py

bench-quick: $(STAMP)
	$(PY) benchmarks/run.py --quick
