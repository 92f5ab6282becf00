# Use the active virtual environment if there is one, else .venv in the repository root.
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PYTHON := $(VENV)/bin/python
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

install: ## Create the virtual environment, install the package with dev tools, and the offline data
	@test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install -e '.[dev]'
	bash scripts/install_data.sh
	mkdir -p data

train: ## Train the default experiment (add overrides with ARGS="model.sharing=full ...")
	$(PYTHON) -m lws_lightning $(ARGS)

test: ## Run the test suite without slow and GPU tests
	$(PYTHON) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: ## Run the slow tests too
	$(PYTHON) -m pytest -m "not gpu" $(PYTEST_ARGS)

lint: ## Check style with ruff
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m ruff format --check src tests benchmarks

format: ## Format the code with ruff
	$(PYTHON) -m ruff check --fix src tests benchmarks
	$(PYTHON) -m ruff format src tests benchmarks

clean: ## Remove caches and run outputs
	rm -rf .pytest_cache .ruff_cache outputs multirun lightning_logs wandb

.PHONY: help install train test test-slow lint format clean
