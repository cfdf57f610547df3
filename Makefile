# Two commands do all the set-up: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEVICES ?= 8
ARGS ?=

.PHONY: demo test lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,examples,dev,bench]"
	touch $(STAMP)

demo: $(STAMP)
	XLA_FLAGS="--xla_force_host_platform_device_count=$(DEVICES) $(XLA_FLAGS)" $(PY) examples/quickstart.py $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q $(ARGS)

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(STAMP)
	XLA_FLAGS="--xla_force_host_platform_device_count=8" $(PY) benchmarks/step_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
