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

## On a GPU machine: what the GPU paths see, their tests, and short GPU benchmarks (figures in gpu-check/).
gpu-check: $(STAMP)
	mkdir -p gpu-check
	nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee gpu-check/device.csv
	$(VENV)/bin/gpuclust backends | tee gpu-check/backends.txt
	$(PY) -m pytest -q -m gpu -rs 2>&1 | tee gpu-check/pytest-gpu.txt
	$(PY) -m bench.cluster --jsonl gpu-check/cluster.jsonl kmeans --n 100000,1000000 --d 64,512 --k 100 --backends all
	$(PY) -m bench.extract --extractors resnet18,efficientnet_lite0 --sizes 128 --batch-sizes 256 --n 4096 --device cuda --gpu-decode | tee gpu-check/extract.txt

clean:
	rm -rf runs .pytest_cache
