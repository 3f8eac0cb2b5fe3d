# The two commands a newcomer needs: `make demo` and `make test`; `make check` is the quick
# loop while editing. Each creates the virtual environment on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo check test lint typecheck bench clean runbook-url

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/loops-watcher --demo

lint: $(STAMP)
	$(BIN)/ruff check watcher tests
	$(BIN)/ruff format --check watcher tests

typecheck: $(STAMP)
	$(BIN)/mypy

# Every test that starts no process (see tests/conftest.py).
check: lint typecheck
	$(BIN)/pytest -m "not process"

test: lint typecheck
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python tests/benchmark.py

# Where every alert's runbook_url points: your copy of deploy/RUNBOOK.md. Change it here, then
# `make runbook-url` rewrites the alert rules, their tests and the PrometheusRule to match.
RUNBOOK_URL ?= https://github.com/loops-watcher/loops-watcher/blob/main/deploy/RUNBOOK.md

runbook-url:
	sed -i -E 's|(runbook_url: "?)[^"#]*#|\1$(RUNBOOK_URL)#|' deploy/prometheus/alerts.yml \
		deploy/prometheus/alerts_test.yml deploy/kubernetes/base/prometheusrule.yaml

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
