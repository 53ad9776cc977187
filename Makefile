# The one place that installs things. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
EDGE_VENV := .venv-edge
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check -q
# torch must be installed first and pinned exactly: a newer or unpinned torch pulls a CUDA build.
TORCH := torch==2.13.0
# amqtt 0.11.4 pins typer 0.15.4, which breaks the flwr CLI; typer 0.20.1 serves both.
TYPER := typer==0.20.1

.PHONY: all setup system-deps test-deps demo test test-fast bench lint docs clean

all: setup

setup: $(VENV)/.stamp $(EDGE_VENV)/.stamp system-deps

$(VENV)/.stamp: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[all]"
	$(PIP) install $(TYPER)
	@touch $@

# An edge-only environment (the `edge` extra, no torch): the tests prove inference runs there.
$(EDGE_VENV)/.stamp: pyproject.toml
	test -x $(EDGE_VENV)/bin/python || $(PYTHON) -m venv $(EDGE_VENV)
	$(EDGE_VENV)/bin/pip --disable-pip-version-check -q install -e ".[edge]"
	@touch $@

# Mosquitto is the production broker and every integration test runs against it.
system-deps:
	@if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq mosquitto; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq mosquitto; \
	  else echo "error: mosquitto is missing; install it (apt-get install mosquitto)"; exit 1; fi; \
	fi

# Chromium: the status page's browser test; PostgreSQL: the validator workers' tests (each
# skipped without it, except in CI). Only the tests need them, so `make demo` does not install
# them.
test-deps:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -qq chromium || { apt-get update -qq && apt-get install -y -qq chromium; }; \
	  else echo "note: chromium is not installed; the status page's browser test will be skipped"; fi; \
	fi
	@if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -qq postgresql || { apt-get update -qq && apt-get install -y -qq postgresql; }; \
	  else echo "note: postgresql is not installed; the validator workers' tests will be skipped"; fi; \
	fi

demo: setup
	$(VENV)/bin/bedside demo --out demo-output

# Two workers (pytest-xdist): most of the suite waits on servers and subprocesses.
TEST_WORKERS ?= 2

test: setup test-deps
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# Unit tests only (no servers).
test-fast: $(VENV)/.stamp
	$(PY) -m pytest -q -m "not integration and not slow"

bench: setup
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/privacy_utility.py
	$(PY) benchmarks/federation.py

# ruff (style), mypy (types), vulture (dead code: product and benchmarks, with the names only a
# framework uses listed in .ci/vulture_whitelist.py).
lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy bedside models edge aggregator demo
	$(VENV)/bin/vulture bedside models edge aggregator demo benchmarks .ci/vulture_whitelist.py --min-confidence 60

# The settings tables of docs/configuration.md, generated from the dataclasses that declare them.
docs: $(VENV)/.stamp
	$(PY) .ci/config_docs.py

clean:
	rm -rf $(VENV) $(EDGE_VENV) demo-output .pytest_cache .mypy_cache .ruff_cache build *.egg-info
