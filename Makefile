# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: install demo test test-gpu gpu-check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,dev]"
	touch $(STAMP)

install: $(STAMP)

## The main job on the embedded default (scikit-learn's digits): no files, no network.
demo: $(STAMP)
	$(VENV)/bin/gpuclust run --out runs/demo

## The test suite (GPU tests skip without CUDA), in two worker processes: a test file stays in one
## worker (its fixtures are built once), heaviest files first (tests/conftest.py orders them), and
## much of the suite waits on subprocesses and servers.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

## On a GPU machine, in the Python that has the GPU packages (not the CPU venv above): `pytest -m gpu`
## and the GPU benchmarks, part by part (torch, then FAISS-GPU, then cuML: bench/gpu_check.py), figures
## in gpu-check/figures.json. Fails, never skips, where CUDA, cuML or a FAISS GPU build is missing.
## A bare machine's install sequence: BENCHMARKS.md, "GPU check". GPU_CHECK_ARGS="--parts torch" etc.
gpu-check:
	$(PYTHON) -m bench.gpu_check --out gpu-check/figures.json $(GPU_CHECK_ARGS)

clean:
	rm -rf runs .pytest_cache
