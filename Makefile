# housing: `make help` lists the targets. Only python3 (3.11+), git and make are
# needed: the first target that needs the environment bootstraps uv into .tools/
# (unless uv is on PATH) and syncs .venv from uv.lock.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON ?= python3
UV_VERSION := 0.13.9
UV := $(or $(shell command -v uv 2>/dev/null),$(CURDIR)/.tools/bin/uv)
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin
# DVC stage commands call `python`: make it the project's.
export PATH := $(BIN):$(PATH)
export VIRTUAL_ENV := $(VENV)

.PHONY: help install run repro test test-fast lint format typecheck bench clean server-up server-down agent-up

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "; printf "Usage: make TARGET\n\n"} \
	  /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(CURDIR)/.tools/bin/uv:
	$(PYTHON) -m venv $(CURDIR)/.tools
	$(CURDIR)/.tools/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --compile-bytecode
	@touch $@

install: $(VENV)/.synced ## Create/refresh the locked environment in .venv (uv.lock)

run: install ## Run the whole pipeline (dvc repro, train stages in parallel), show the outcome
	HOUSING_RUN_ID=$${HOUSING_RUN_ID:-$$(date -u +%Y%m%dT%H%M%SZ)-make} housing repro
	@housing status

repro: run ## Alias of run

test: install ## Run the full test suite (slow and integration tests included)
	bash scripts/ensure_test_tools.sh
	pytest -q -n 2 --dist loadfile --durations=15

test-fast: install ## Run the fast tests (not slow, not integration; under 3 minutes)
	pytest -q -m "not slow and not integration"

lint: install ## ruff lint + format check, mypy (strict)
	ruff check .
	ruff format --check .
	mypy

format: install ## Apply ruff fixes and formatting
	ruff check --fix .
	ruff format .

typecheck: install ## mypy only
	mypy

bench: install ## Benchmarks: pipeline vs bare sklearn, synthetic scale-up (prints figures)
	python benchmarks/bench.py

server-up: ## Start the self-hosted ClearML server (infra/clearml; creates .env from the example)
	cd infra/clearml && { [ -f .env ] || cp .env.example .env; } && docker compose up -d

server-down: ## Stop the ClearML server (data stays in infra/clearml/data)
	cd infra/clearml && docker compose down

agent-up: ## Start a ClearML agent (needs CLEARML_AGENT_ACCESS_KEY/SECRET_KEY in infra/clearml/.env)
	cd infra/clearml && docker compose --profile agent up -d clearml-agent

clean: ## Remove run outputs (keeps .venv and the DVC cache)
	rm -rf data/raw data/processed models metrics metrics.json plots reports .clearml mlruns mlflow.db
