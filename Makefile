# Three commands on a fresh clone: `make demo` (train the example, write TensorBoard logs and the figure),
# `make tensorboard` (serve those logs) and `make test` (lint, type-check, docs, tests). Each creates .venv when it
# is missing and installs what it needs into it.
#
# Which torch: TORCH_REQ is the requirement installed first, from TORCH_INDEX when that is set. By default, on Linux
# without an NVIDIA GPU (no `nvidia-smi -L` output), TORCH_INDEX is PyTorch's CPU-only index: the Linux wheels on
# PyPI bundle CUDA (several GB). With a GPU, or on macOS and Windows, torch comes from PyPI. Set both to choose
# yourself, e.g. `make demo TORCH_INDEX=` (PyPI and your pip configuration) or
# `make test TORCH_REQ=torch==2.13.0 TORCH_INDEX=`. A changed choice reinstalls torch at the next command.

PYTHON ?= python3
VENV ?= .venv
TORCH_REQ ?= torch>=2.4
ifeq ($(origin TORCH_INDEX),undefined)
TORCH_INDEX := $(if $(filter Linux,$(shell uname -s)),$(if $(shell nvidia-smi -L 2>/dev/null),,https://download.pytorch.org/whl/cpu))
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_STAMP := $(VENV)/.torch
TORCH_CHOICE := $(strip $(TORCH_REQ) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)))
DEMO_CONFIG ?= examples/configs/mnist1d_layca.yaml
LOGDIR ?= logs
# `make test` runs the tests in this many processes (pytest-xdist), each test file whole in one of them, so that a
# file's shared fits and compiled kernels stay in one process; PYTEST_WORKERS=0 runs them serially in one process.
PYTEST_WORKERS ?= 2

.PHONY: demo tensorboard test lint typecheck docs clean

# The torch stamp holds the choice it was installed with: another choice makes it out of date.
ifneq "$(TORCH_CHOICE)" "$(strip $(shell cat $(TORCH_STAMP) 2>/dev/null))"
.PHONY: $(TORCH_STAMP)
endif

$(TORCH_STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# Another build of torch (CUDA or CPU) may be installed; pip would keep it as it satisfies the requirement.
	if $(BIN)/python -m pip show --quiet torch 2>/dev/null; then $(BIN)/python -m pip uninstall --quiet --yes torch; fi
	$(BIN)/python -m pip install --quiet "$(TORCH_REQ)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	echo '$(TORCH_CHOICE)' > $@

$(STAMP): pyproject.toml $(TORCH_STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,examples,docs]"
	touch $@

# MNIST-1D (generated offline) with SGD + Layca through LightningCLI: TensorBoard logs and the rotation figure go
# to logs/<run>/version_<n>/. Under a minute on a 2-core CPU, longer when other jobs share it (see README.md).
demo: $(STAMP)
	$(BIN)/python -m examples.cli fit --config $(DEMO_CONFIG)

# Serves logs/ (LOGDIR=...) on http://localhost:6006 until Ctrl+C.
tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir $(LOGDIR)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check lightning_layca

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck docs $(STAMP)
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile

# The documentation site (mkdocs.yml): --strict turns every warning (a broken link, a page left out of the
# navigation, a docstring the API reference cannot render) into a failure.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) lightning_logs logs site build dist .pytest_cache .mypy_cache .ruff_cache
