# Entry points for people and CI. Every target sets up what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
N ?= 100000
READINGS ?= 0

.PHONY: install run test psql bench clean

install: $(STAMP)

$(STAMP): requirements-dev.txt constraints.txt mock-server/pyproject.toml pipeline-service/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (set PYTHON=...)")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements-dev.txt
	@touch $(STAMP)

run: install
	$(BIN)/python -m pipeline_service.devstack run

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

psql: install
	@$(BIN)/python -m pipeline_service.devstack psql

bench: install
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -r bench/requirements.txt
	$(BIN)/python bench/run.py --records $(N) --readings $(READINGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
