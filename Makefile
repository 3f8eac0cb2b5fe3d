# The two commands a newcomer needs: `make demo` and `make test`; `make check` is the quick
# loop while editing. Each creates the virtual environment on first use, from uv.lock.
PYTHON     ?= python3
VENV       := .venv
BIN        := $(VENV)/bin
# uv installs exactly what uv.lock says; it lives in its own small environment.
UV_VERSION := 0.13.9
UV         := .tools/bin/uv
# Use the Python that runs make, never one uv would download.
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never

.PHONY: demo runtime dev check test lint typecheck bench lock image clean runbook-url

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet uv==$(UV_VERSION)

# --locked: stop, instead of resolving anew, when pyproject.toml and uv.lock disagree.
runtime: $(UV)
	$(UV) sync --locked --quiet --no-dev --inexact

dev: $(UV)
	$(UV) sync --locked --quiet

lock: $(UV)
	$(UV) lock

demo: runtime
	$(BIN)/loops-watcher --demo

lint: dev
	$(BIN)/ruff check watcher tests benchmarks
	$(BIN)/ruff format --check watcher tests benchmarks

typecheck: dev
	$(BIN)/mypy

# Tests run in two processes (pytest-xdist), one test file to each at a time, so a module's
# shared fixtures stay shared; most of the suite waits on sockets, so two halve its time.
PYTEST := $(BIN)/pytest -n 2 --dist loadfile

# Every test that starts no process (see tests/conftest.py).
check: lint typecheck
	$(PYTEST) -m "not process"

test: lint typecheck
	$(PYTEST)

bench: dev
	$(BIN)/python benchmarks/benchmark.py

# The container image, tagged as deploy/kubernetes names it (the kustomization's `images:`).
# Never part of `make test`: it needs a container engine (CONTAINER=podman or buildah work too).
CONTAINER ?= docker
VERSION   := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)

image:
	$(CONTAINER) build -t loops-watcher:$(VERSION) .

# Where every alert's runbook_url points: your copy of deploy/RUNBOOK.md. Change it here, then
# `make runbook-url` rewrites the alert rules, their tests and the PrometheusRule to match.
RUNBOOK_URL ?= https://github.com/loops-watcher/loops-watcher/blob/main/deploy/RUNBOOK.md

runbook-url:
	sed -i -E 's|(runbook_url: "?)[^"#]*#|\1$(RUNBOOK_URL)#|' deploy/prometheus/alerts.yml \
		deploy/prometheus/alerts_test.yml deploy/kubernetes/base/prometheusrule.yaml

clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache build *.egg-info
