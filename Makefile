# Everything runs inside .venv, created on first use from this repository's own files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-stack test-slow test-all run compare-standard compare-frontier compare-efficiency compare-domain gpu-check lint bench bench-full bench-train-step bench-install clean

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

## The same suite in a second environment with Python 3.12 and megatron-core 0.19.2 (which needs
## Python >= 3.12), so tests/megatron runs too (the .venv run skips it with one line). torch from the
## registry is the CUDA build (about 5 GB with its nvidia wheels) and runs on the CPU. megatron-core's
## own requirements are torch, numpy and packaging; its CUDA-only extras (te, dev) are not installed.
## STACK_PYTHON names the interpreter; without one the target skips with one line.
## The first python3.12 that runs (a pyenv shim for a version not selected does not), else pyenv's own.
STACK_PYTHON ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12; do \
	$$p -c "import sys; assert sys.version_info[:2] == (3, 12)" >/dev/null 2>&1 && { command -v $$p; break; }; done)
STACK_VENV := .venv-stack
STACK_PY := $(STACK_VENV)/bin/python
STACK_STAMP := $(STACK_VENV)/.installed

$(STACK_STAMP): pyproject.toml
	$(STACK_PYTHON) -m venv $(STACK_VENV)
	$(STACK_PY) -m pip install --upgrade pip
	$(STACK_PY) -m pip install "torch==2.11.0"
	# transformers 5.17.0 (the release this environment checks the HF adapter with), before the project.
	$(STACK_PY) -m pip install "transformers==5.17.0"
	$(STACK_PY) -m pip install -e ".[dev,megatron]"
	touch $(STACK_STAMP)

## What CI runs there: the suites whose outcome depends on the torch / transformers / megatron-core
## versions (Megatron-Core, the HF adapters, routing, experts and their compiled graphs). The whole
## suite there (1421 passed in 5 min on an idle 2-core machine, about 30 min on a busy one): make test-stack STACK_TESTS=tests
STACK_TESTS ?= tests/megatron tests/hf tests/routing tests/test_graph_breaks.py tests/test_experts.py \
	tests/test_experts_grouped.py tests/test_layer_reference.py tests/test_golden.py
test-stack:
	@if [ -z "$(STACK_PYTHON)" ]; then \
		echo "test-stack: skipped, no python3.12 here (set STACK_PYTHON=/path/to/python3.12)"; \
	else \
		$(MAKE) --no-print-directory $(STACK_STAMP) && OMP_NUM_THREADS=2 $(STACK_PY) -m pytest -m "not slow" -q $(STACK_TESTS); \
	fi

## The slower tests, kept green in their own target.
test-slow: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -m slow -q

test-all: test test-slow

## The main job: the quick comparison of LocMoE+ against the baselines (report in runs/compare).
run: $(STAMP)
	$(PY) -m locmoe compare --quick --out runs/compare

## The published comparison (about 60-90 min on 2 cores) and the compute-quality frontier (about an hour).
compare-standard: $(STAMP)
	$(PY) -m locmoe compare --preset standard --out runs/compare-standard

compare-frontier: $(STAMP)
	$(PY) -m locmoe compare --preset frontier --out runs/frontier

## The pre-registered efficiency test (63 runs, about 4 h on one thread; re-running resumes and reuses).
compare-efficiency: $(STAMP)
	$(PY) -m locmoe compare --preset efficiency --threads 1 --out runs/efficiency

## The domain preset (about 45 minutes here): fetches the Linux networking docs (Debian linux-doc) on first use.
compare-domain: $(STAMP)
	$(PY) -m locmoe compare --preset domain --out runs/domain

## On a machine with a CUDA GPU and torch already installed (no .venv needed), under 8 minutes: the CUDA
## tests and the layer suites, a training smoke (eager, compiled, exact resume) and the layer benchmark
## against HF Mixtral and the grouped-GEMM floor; one summary, JSON to $OUT (see benchmarks/gpu_check.py).
## GPU_CHECK_ARGS adds flags (e.g. GPU_CHECK_ARGS="--only layer"; "--cpu-smoke" runs it all on a CPU).
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=. $(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check locmoe tests benchmarks examples

BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	DS_BUILD_OPS=0 $(PY) -m pip install --no-build-isolation -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench-install: $(BENCH_STAMP)

## Benchmarks: print tables, write JSON to benchmarks/results/. BENCH_THREADS=1 gives steadier numbers
## on a machine shared with other jobs; BENCH_ARGS adds flags (e.g. BENCH_ARGS="--d 512 --S 8192").
BENCH_THREADS ?= 2
## The issue-7 target sizes, fp32 (and bf16 where the CPU has it natively): about 14 min on 2 cores.
bench: $(BENCH_STAMP)
	OMP_NUM_THREADS=$(BENCH_THREADS) $(PY) benchmarks/layer.py --quick --threads $(BENCH_THREADS) $(BENCH_ARGS)

## Every router, size (d 256/512/1024 x S 2048/8192), fp32 and bf16 (hours).
bench-full: $(BENCH_STAMP)
	OMP_NUM_THREADS=$(BENCH_THREADS) $(PY) benchmarks/layer.py --preset full --threads $(BENCH_THREADS) $(BENCH_ARGS)

## Full training-step time per router on the default model (a few minutes).
bench-train-step: $(STAMP)
	OMP_NUM_THREADS=$(BENCH_THREADS) $(PY) benchmarks/train_step.py --threads $(BENCH_THREADS) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(STACK_VENV) .pytest_cache build *.egg-info
