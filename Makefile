# Everything runs inside .venv, created on first use from this repository's own files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-slow test-all run lint bench bench-install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch is pinned to the CPU build that lies on disk here; an unpinned torch pulls a CUDA build.
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## The test suite (what CI runs): everything except tests marked slow.
test: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -m "not slow" -q

## The slower tests, kept green in their own target.
test-slow: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -m slow -q

test-all: test test-slow

## The main job.
run: $(STAMP)
	$(PY) -m locmoe demo

lint: $(STAMP)
	$(PY) -m ruff check locmoe tests benchmarks

BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	DS_BUILD_OPS=0 $(PY) -m pip install --no-build-isolation -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench-install: $(BENCH_STAMP)

## Benchmarks: print tables, write JSON to benchmarks/results/.
bench: $(BENCH_STAMP)
	OMP_NUM_THREADS=2 $(PY) benchmarks/layer.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
