# WalkRank: every target sets itself up (.venv + locked install) on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every version the suite passed with; `make lock` re-resolves it from pyproject.toml.
LOCK := requirements.lock

.PHONY: setup demo test lint format stubs bench serve lock clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

## The main job: the demo world end to end.
demo: $(STAMP)
	$(BIN)/walkrank demo

## The whole test suite (what CI runs).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## Apply the formatter (the pre-commit hook in .pre-commit-config.yaml runs the same).
format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Regenerate the gRPC stubs from protos/ (committed; a test checks they match).
stubs: $(STAMP)
	$(BIN)/python -m walkrank_client.codegen

bench: $(STAMP)
	$(BIN)/python benchmarks/walks.py --quick
	$(BIN)/python benchmarks/scoring.py --quick

serve: $(STAMP)
	$(BIN)/walkrank serve

## Re-resolve requirements.lock from pyproject.toml (pip-tools, with pip's own indexes, so
## torch resolves to the local CPU wheel rather than a CUDA build).
lock:
	test -x .cache/lock-venv/bin/pip-compile || ( $(PYTHON) -m venv .cache/lock-venv && \
		.cache/lock-venv/bin/python -m pip install --quiet "pip-tools>=7.4" )
	.cache/lock-venv/bin/pip-compile --quiet --extra dev --strip-extras --no-emit-index-url \
		--no-emit-find-links --unsafe-package walkrank --upgrade -o $(LOCK) \
		pyproject.toml

clean:
	rm -rf $(VENV) .cache
