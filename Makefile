# fedsp — every target sets up what it needs, so a fresh clone needs no manual steps.
#   make test    venv + deps (and libtpu, for the planner) + default model, make lint, then
#                the whole test suite (slow tests too)
#   make lint    ruff (lint + format check, ruff.toml) and mypy on fedsp/ (mypy.ini)
#   make test-fast   the suite without the tests marked slow
#   make bench   the benchmarks in benchmarks/ (results go to BENCHMARKS.md by hand)
#   make bench-round   federated round vs clients per round + the spear_client_update unit
#   make demo    federated SPEAR on arithmetic with SmolLM2-135M into runs/demo (prints the table)

PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.fedsp-installed
# Simulated CPU devices for the multi-device tests (tests/conftest.py reads it).
export FEDSP_TEST_DEVICES ?= 4
# The benchmark files live beside the checkout (never committed); tests read them from here.
export FEDSP_DATA_DIR ?= $(abspath ../shared/data)
# Two pytest workers (one per core here); files stay whole so module fixtures load once.
TEST_WORKERS ?= 2
PYTEST_ARGS ?=

.PHONY: setup setup-plan assets lint test test-fast bench bench-round demo tables clean

# Re-installs only when setup.py changes, so a second `make test` starts at once.
$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

# libtpu (~680 MB) for the capacity planner's TPU targets, Flower for the federation
# tests and dp_accounting for ε: the tests need them, the demo does not.
PLAN_STAMP := $(VENV)/.fedsp-plan-installed
$(PLAN_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,plan,flower,dp]'
	@touch $(PLAN_STAMP)

setup-plan: $(PLAN_STAMP)

# Fetches SmolLM2-135M-Instruct (GGUF) into $$FEDSP_CACHE (default ~/.cache/fedsp) once.
assets: setup
	$(PY) -m fedsp.assets

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: setup-plan assets lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS)

test-fast: setup-plan assets
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

bench: setup assets bench-round
	$(PY) -m benchmarks.model

# Each configuration runs in its own child process (its own peak RSS); ≈ 14 + 7 min here.
bench-round: setup assets
	$(PY) -m benchmarks.round
	$(PY) -m benchmarks.client_update

# A second `make demo` resumes runs/demo from its last checkpoint (or prints the
# finished table at once); `rm -rf runs/demo` starts over.
demo: setup assets
	$(PY) -m experiments.run --config=experiments/configs/demo.py --workdir=runs/demo

# The paper-style tables at CPU scale into experiments/results (resumable: cells finished
# under runs/tables are skipped). TABLE=spear|tpaw|aggregation|settings|robustness|all.
TABLE ?= all
# dp_accounting (the dp extra) for the robustness table's ε.
DP_STAMP := $(VENV)/.fedsp-dp-installed
$(DP_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,dp]'
	@touch $(DP_STAMP)

tables: setup assets $(DP_STAMP)
	$(PY) -m experiments.tables --table $(TABLE) --workdir runs/tables

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
