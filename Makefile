# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: install demo test test-gpu gpu-check bench clean

# The install compiles no bytecode: Python compiles each module on its first import and keeps it under
# $(VENV)/pycache, also where PYTHONDONTWRITEBYTECODE is set. Nothing is compiled that is never imported
# (compiling the whole environment at install took a minute on 2 cores), gpuclust's own modules and
# pytest's rewritten test files are compiled once, and nothing is written beside the sources.
export PYTHONPYCACHEPREFIX := $(abspath $(VENV))/pycache
unexport PYTHONDONTWRITEBYTECODE

# uv installs the same packages as pip in a fraction of the time (parallel downloads, and the wheels
# it downloaded kept for the next install). uv reads none of pip's configuration: pip's index,
# find-links and constraint settings (files and PIP_* variables) are handed to it, and
# `unsafe-best-match` takes the highest version across indexes, as pip does. Where uv cannot install
# (no uv wheel reachable, an index it cannot read), pip does.
# `make install INSTALLER=pip` installs with pip alone (bench/install_time.py times both).
INSTALLER ?= uv
PIP_SETTINGS_FOR_UV = $(PY) -m pip config list 2>/dev/null \
	| sed -n "s/^[^.]*\.\(index-url\|extra-index-url\|find-links\|constraint\)='\(.*\)'$$/\1 \2/p" \
	| awk '{for (i = 2; i <= NF; i++) printf "--%s %s ", $$1, $$i}'
PIP_INSTALL = $(PY) -m pip install -q --no-compile -e ".[cpu,dev]"
ifeq ($(INSTALLER),pip)
INSTALL_PACKAGES = $(PIP_INSTALL)
else
INSTALL_PACKAGES = { $(PY) -m pip install -q uv && $(VENV)/bin/uv pip install -q --python $(PY) \
		--index-strategy unsafe-best-match $$($(PIP_SETTINGS_FOR_UV)) -e ".[cpu,dev]"; } \
	|| { echo "uv could not install the packages: pip installs them"; $(PIP_INSTALL); }
endif

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(INSTALL_PACKAGES)
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
