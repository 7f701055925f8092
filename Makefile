# lqseg-jax: `make demo` (virtualenv + the embedded synthetic demo) and `make test` (lint + the suite).
#
# Installs come from the locks, exact versions with every transitive dependency: requirements.lock for the
# runtime (`make demo`), requirements-test.lock for the tests (`make test`, and so CI). requirements.txt
# and requirements-test.txt keep the version ranges a library user installs; after changing them (or to
# move to newer releases), run `make lock`, then `make test` and `make demo`, and commit the locks.
# `make check-unlocked` installs the newest releases inside the ranges into .venv-unlocked and runs a
# quick part of the suite there (not part of CI).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_WORKERS ?= 2
PIP := python -m pip install -q
# --no-deps: only what the lock names; --no-build-isolation: the project is built with the locked setuptools.
LOCKED_INSTALL = $(BIN)/$(PIP) --no-deps -r $(1) && $(BIN)/$(PIP) --no-deps --no-build-isolation -e . \
	&& $(BIN)/python -m pip check && $(BIN)/python scripts/check_lock.py $(1)
QUICK_TESTS := tests/test_import_layout.py tests/test_requirements.py tests/models/test_mit.py \
	tests/models/test_clip_text_parity.py tests/models/test_sd_vae_parity.py tests/data_pipelines/test_pipeline.py \
	tests/eval tests/train/test_optim.py

.PHONY: demo test lint format venv lock check-unlocked gpu-suite-smoke clean

$(VENV)/.runtime: requirements.lock pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(call LOCKED_INSTALL,requirements.lock)
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.lock
	$(call LOCKED_INSTALL,requirements-test.lock)
	touch $@

venv: $(VENV)/.test

demo: $(VENV)/.runtime
	$(BIN)/python scripts/demo.py

lint: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --durations=15

# Resolve the ranges afresh in a throw-away virtualenv and write both locks (the test lock is resolved
# under the runtime lock, so the two never disagree).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/$(PIP) --upgrade pip setuptools
	.venv-lock/bin/$(PIP) -r requirements.txt
	.venv-lock/bin/python scripts/check_lock.py --write requirements.lock
	.venv-lock/bin/$(PIP) -r requirements-test.txt -c requirements.lock
	.venv-lock/bin/python scripts/check_lock.py --write requirements-test.lock
	rm -rf .venv-lock

check-unlocked:
	rm -rf .venv-unlocked && $(PYTHON) -m venv .venv-unlocked
	.venv-unlocked/bin/$(PIP) --upgrade pip setuptools
	.venv-unlocked/bin/$(PIP) --upgrade --upgrade-strategy eager -r requirements-test.txt
	.venv-unlocked/bin/$(PIP) --no-deps --no-build-isolation -e .
	.venv-unlocked/bin/python scripts/check_lock.py --diff requirements-test.lock
	.venv-unlocked/bin/python -m pytest -n $(PYTEST_WORKERS) -q -p no:cacheprovider $(QUICK_TESTS)

# benchmarks/gpu_suite.py end to end on CPU at the smallest shapes (writes benchmarks/gpu_suite_out/).
gpu-suite-smoke: $(VENV)/.test
	$(BIN)/python benchmarks/gpu_suite.py --cpu-smoke

clean:
	rm -rf $(VENV) .venv-lock .venv-unlocked runs/demo data/synthetic
