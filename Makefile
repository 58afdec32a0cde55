# Two commands on a fresh machine: `make demo` (train the example, write TensorBoard logs and the figure) and
# `make test` (lint, type-check, tests, docs). Each creates .venv when it is missing.
#
# TORCH_REQ chooses the torch requirement installed first. The default lets pip pick the build for this platform
# (on Linux x86_64 that is a CUDA build); on a CPU-only machine use e.g. TORCH_REQ="torch==2.13.0" or
# TORCH_INDEX=https://download.pytorch.org/whl/cpu.

PYTHON ?= python3
VENV ?= .venv
TORCH_REQ ?= torch>=2.4
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_CONFIG ?= examples/configs/mnist1d_layca.yaml

.PHONY: demo test lint typecheck docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_REQ)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[test,examples,docs]"
	touch $(STAMP)

# MNIST-1D (generated offline) with SGD + Layca through LightningCLI: TensorBoard logs and the rotation figure go
# to logs/<run>/version_<n>/. About a minute on a 2-core CPU.
demo: $(STAMP)
	$(BIN)/python -m examples.cli fit --config $(DEMO_CONFIG)
	@echo "To browse the run: $(BIN)/tensorboard --logdir logs   (then open http://localhost:6006)"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check lightning_layca

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck docs $(STAMP)
	$(BIN)/pytest -q

# The documentation site (mkdocs.yml): --strict turns every warning (a broken link, a page left out of the
# navigation, a docstring the API reference cannot render) into a failure.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) lightning_logs logs site .pytest_cache .mypy_cache .ruff_cache
