# Two commands do all the set-up: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEVICES ?= 8
ARGS ?=

.PHONY: demo test format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,examples,dev]"
	touch $(STAMP)

$(VENV)/.bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	touch $@

demo: $(STAMP)
	XLA_FLAGS="--xla_force_host_platform_device_count=$(DEVICES) $(XLA_FLAGS)" $(PY) examples/nnx_digits.py $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q $(ARGS)

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(VENV)/.bench
	$(PY) benchmarks/step_overhead.py
	$(PY) benchmarks/collectives.py
	$(PY) benchmarks/steps_per_run.py
	$(PY) benchmarks/input_pipeline.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
