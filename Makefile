# kubelora: `make demo` and `make test` each do all of their own set-up on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export GOTOOLCHAIN := local
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: help venv tools dev-up dev-down dev-status crds check-crds lint test test-unit demo bench clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

venv: $(STAMP) ## Create the virtualenv and install kubelora with all extras

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "Installing Python dependencies (torch from PyPI is several GB on a cold cache)"
	$(PY) -m pip install --progress-bar on -c constraints.txt -e '.[operator,trainer,serve,dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

tools: venv ## Build etcd, Kubernetes, kwok, MinIO and Helm from pinned versions (cached)
	$(PY) -m kubelora.devenv build

dev-up: tools ## Start the local control plane with fake GPU nodes, and MinIO
	$(PY) -m kubelora.devenv up

dev-down: ## Stop the local environment
	@if [ -x $(PY) ]; then $(PY) -m kubelora.devenv down; fi

dev-status: ## Show the local environment
	$(PY) -m kubelora.devenv status

crds: venv ## Regenerate crds/ and docs/api-reference.md from the API models
	$(PY) -m kubelora.api.crdgen --out crds --docs docs/api-reference.md
	$(PY) helm/kubelora/sync-crds.py

check-crds: venv ## Fail when crds/ or docs/api-reference.md are stale
	$(PY) -m kubelora.api.crdgen --out crds --docs docs/api-reference.md --check
	$(PY) helm/kubelora/sync-crds.py --check

lint: venv ## ruff and mypy
	$(VENV)/bin/ruff check operator trainer tests bench
	$(VENV)/bin/ruff format --check operator trainer tests bench
	$(VENV)/bin/mypy -p kubelora

test: venv tools lint ## Lint, then every test against the real control plane, MinIO and trainer
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv ## Tests that need no environment
	$(PY) -m pytest -m "not e2e" $(PYTEST_ARGS)

demo: tools ## The whole story on one machine
	$(PY) -m kubelora.demo

bench: tools ## Benchmarks (JSON on stdout)
	$(PY) bench/trainer.py
	$(PY) bench/operator.py
	$(PY) bench/rollout.py

clean: dev-down ## Remove the virtualenv (the tool cache in ~/.cache/kubelora stays)
	rm -rf $(VENV)
