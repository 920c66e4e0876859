# WalkRank: every target sets itself up (.venv + editable install) on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint stubs bench serve clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

## The main job: the demo world end to end.
demo: $(STAMP)
	$(BIN)/walkrank demo

## The whole test suite (what CI runs).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

## Regenerate the gRPC stubs from protos/ (committed; a test checks they match).
stubs: $(STAMP)
	$(BIN)/python -m walkrank_client.codegen

bench: $(STAMP)
	$(BIN)/python benchmarks/walks.py --quick
	$(BIN)/python benchmarks/scoring.py --quick

serve: $(STAMP)
	$(BIN)/walkrank serve

clean:
	rm -rf $(VENV) .cache
