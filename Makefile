# vesselnb: the two commands of the README are `make demo` and `make test`; both set up .venv first.
# The set-up installs the CPU torch wheel FIRST (torch==2.13.0), so nothing later pulls a CUDA build of torch.
# For a GPU machine use environment.yml instead (conda), then `pip install -e .` inside it.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.vesselnb-setup-done
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench lab index clean-outputs

setup: $(STAMP)

# Rerun only when the dependencies change; otherwise `make setup` is instant.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[test]"
	$(BIN)/python -m ipykernel install --sys-prefix --name vesselnb --display-name "Python (vesselnb)"
	@touch $(STAMP)

demo: setup
	@start=$$(date +%s); \
	$(BIN)/vesselnb demo --outputs outputs; rc=$$?; \
	echo "make demo: $$(( $$(date +%s) - start )) s, outputs/ is $$(du -sh outputs | cut -f1); open outputs/index.html"; \
	exit $$rc

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check vesselnb tests bench

bench: setup
	@set -e; for script in bench/bench_*.py; do [ -e "$$script" ] || continue; echo "== $$script"; $(BIN)/python "$$script"; done

# JupyterLab is not a core dependency (it is heavy); this installs it into the venv once and opens the notebooks.
lab: setup
	$(BIN)/python -m pip install -e ".[lab]"
	$(BIN)/jupyter lab notebooks/

index: setup
	$(BIN)/vesselnb index --outputs outputs

clean-outputs:
	find outputs -mindepth 1 -maxdepth 1 ! -name README.md ! -name .gitkeep -exec rm -rf {} +
