# Two commands do all the set-up on a fresh clone:
#   make demo   -- creates .venv, installs, runs the main job
#   make test   -- creates .venv, installs, runs lint, type check and the test suite
#   make docs   -- builds the documentation site (warnings are errors) into docs/_build/html
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint typecheck pytest bench docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned to the CPU build first so nothing pulls CUDA wheels.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m secondorder spiral

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples docs/conf.py
	$(VENV)/bin/ruff format --check src tests benchmarks examples docs/conf.py

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" tests

test: lint typecheck pytest

bench: $(STAMP)
	$(PY) -m secondorder bench

# The user guide, the API reference and the gallery (each example is executed).
docs: $(STAMP)
	MPLBACKEND=Agg $(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) runs docs/_build docs/api/generated docs/auto_examples docs/sg_execution_times.rst

# Acceptance runs of the seed studies (minutes): not part of `make test`.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests
