# WalkRank: every target sets itself up (.venv + locked install) on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Setup installs three distributions editable: the client SDK (client/: the API stubs, no server
# dependencies), the server (depends on the client for the stubs) and the load-test kit
# (load_tests/, import name `loadgen`). The lock holds every third-party version.
STAMP := $(VENV)/.installed
# Every version the suite passed with; `make lock` re-resolves it from pyproject.toml.
LOCK := requirements.lock

.PHONY: setup demo test test-fast lint typecheck format stubs bench serve lock clean

$(STAMP): pyproject.toml client/pyproject.toml load_tests/pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e ./client -e . -e ./load_tests
	touch $(STAMP)

setup: $(STAMP)

## The main job: the demo world end to end.
demo: $(STAMP)
	$(BIN)/walkrank demo

## The whole test suite (what CI runs): lint, formatter, types, unit and end-to-end tests.
test: lint typecheck
	$(BIN)/python -m pytest -q

## Unit tests only (no `e2e` marker: no child processes, no servers on a socket).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## mypy over the server, client and load-test packages and tools/ ([tool.mypy] in pyproject.toml).
typecheck: $(STAMP)
	$(BIN)/mypy

## Apply the formatter (the pre-commit hook in .pre-commit-config.yaml runs the same).
format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Regenerate the gRPC stubs from protos/ (committed; a test checks they match).
stubs: $(STAMP)
	$(BIN)/python tools/codegen.py

bench: $(STAMP)
	$(BIN)/python benchmarks/walks.py --quick
	$(BIN)/python benchmarks/scoring.py --quick

serve: $(STAMP)
	$(BIN)/walkrank serve

## Re-resolve requirements.lock from pyproject.toml (pip-tools, with pip's own indexes, so
## torch resolves to the local CPU wheel rather than a CUDA build). The client is built into
## a local wheel first so the server's dependency on it resolves; our own three distributions
## stay out of the lock (setup installs them editable). `make lock LOCK_UPGRADE=` adds new
## requirements while keeping every existing pin.
LOCK_UPGRADE ?= --upgrade
lock:
	test -x .cache/lock-venv/bin/pip-compile || ( $(PYTHON) -m venv .cache/lock-venv && \
		.cache/lock-venv/bin/python -m pip install --quiet "pip-tools>=7.4" )
	rm -rf .cache/lock-wheels
	.cache/lock-venv/bin/python -m pip wheel --quiet --no-deps -w .cache/lock-wheels ./client
	.cache/lock-venv/bin/pip-compile --quiet --extra dev --strip-extras --no-emit-index-url \
		--no-emit-find-links --find-links .cache/lock-wheels --unsafe-package walkrank \
		--unsafe-package walkrank-client $(LOCK_UPGRADE) -o $(LOCK) \
		pyproject.toml

clean:
	rm -rf $(VENV) .cache
