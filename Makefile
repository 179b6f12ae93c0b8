# gptoss-batch: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## List the targets with one line each
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## Create .venv and install the package with its dev tools

demo: $(STAMP) ## Start the embedded server, run sample_prompts/ through it, print the summary
	$(BIN)/python scripts/demo.py

demo-real: $(STAMP) ## The same through llama.cpp's llama-server and Gemma 3 270M (.venv-real; first build ~20 min)
	$(BIN)/python -m scripts.demo_real

test: $(STAMP) ## Run the whole test suite
	$(BIN)/python -m pytest -q

test-real: $(STAMP) ## End-to-end tests against real llama-server and transformers serve (installs .venv-real)
	$(BIN)/python -m scripts.real_servers install all
	$(BIN)/python -m pytest -q -m e2e tests/e2e --durations=5

lint: $(STAMP) ## ruff + mypy --strict
	$(BIN)/ruff check gptoss_batch tests benchmarks scripts
	$(BIN)/mypy

GUIDELLM := .bench/guidellm/bin/guidellm

bench: $(STAMP) ## Run every benchmark (~40 min), print the tables and rewrite BENCHMARKS.md
	@test -x $(GUIDELLM) || $(MAKE) bench-guidellm || echo "guidellm could not be installed: BENCHMARKS.md will say so"
	$(BIN)/python -m benchmarks --write BENCHMARKS.md

bench-quick: $(STAMP) ## A smoke run of every benchmark, about 45 s (prints the tables; BENCHMARKS.md is left alone)
	$(BIN)/python -m benchmarks --quick

bench-guidellm: ## Install guidellm (a peer in the pipeline benchmark; torch included, a few GB) into .bench/
	$(PYTHON) -m venv .bench/guidellm
	.bench/guidellm/bin/pip install --quiet guidellm

clean: ## Remove the virtualenvs and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

.PHONY: help venv demo demo-real test test-real lint bench bench-quick bench-guidellm clean
