# `make demo` and `make test` do all the set-up: each creates .venv when missing.
# The tests run against the built wheel installed in .venv, never against the source tree.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
WHEEL := dist/tpustrat-$(VERSION)-py3-none-any.whl
SOURCES := pyproject.toml README.md LICENSE $(wildcard tpustrat/*.py tpustrat/py.typed)
DEVICES ?= 8
ARGS ?=
# The oldest versions that support all of tpustrat: Flax NNX support needs flax 0.12.6, which
# needs jax 0.8.1 (the core alone claims jax >= 0.7).
OLDEST_VENV := .venv-oldest
OLDEST_PINS := jax==0.8.1 jaxlib==0.8.1 flax==0.12.6 optax==0.2.5 orbax-checkpoint==0.11.20
# The benchmarks write into the ignored benchmarks/results/local/; RECORD=1 updates the tracked
# benchmarks/results/ that benchmarks/README.md quotes.
BENCH_FLAGS := $(if $(RECORD),--record)
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test test-oldest docs bench format clean

# Dependencies (and `build`) once per change of pyproject.toml; tpustrat itself comes from the wheel.
$(DEPS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "build>=1.2"
	rm -rf build/lib build/bdist.*  # setuptools' staging, which would carry a deleted module into the wheel
	$(PY) -m build --quiet --wheel --outdir dist .
	$(PY) -m pip install --quiet "$(WHEEL)[test,examples,docs,dev]"
	touch $@

$(WHEEL): $(SOURCES) | $(DEPS)
	rm -rf build/lib build/bdist.*  # setuptools' staging, which would carry a deleted module into the wheel
	$(PY) -m build --quiet --wheel --outdir dist .

$(VENV)/.wheel: $(WHEEL)
	$(PY) -m pip install --quiet --force-reinstall --no-deps $(WHEEL)
	touch $@

$(VENV)/.bench: $(DEPS)
	$(PY) -m pip install --quiet "$(WHEEL)[bench]"
	touch $@

demo: $(VENV)/.wheel
	XLA_FLAGS="--xla_force_host_platform_device_count=$(DEVICES) $(XLA_FLAGS)" $(PY) examples/nnx_digits.py $(ARGS)

# pytest runs as .venv/bin/pytest (not `python -m pytest`, which would put the source tree on
# sys.path); TPUSTRAT_TEST_INSTALLED makes conftest.py refuse a tpustrat imported from ./tpustrat.
test: $(VENV)/.wheel
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/pyrefly check
	$(VENV)/bin/mkdocs build --strict --quiet
	TPUSTRAT_TEST_INSTALLED=1 $(VENV)/bin/pytest -q $(ARGS)

$(OLDEST_VENV)/.installed: $(WHEEL)
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install --quiet "$(WHEEL)[test,examples]" $(OLDEST_PINS)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --force-reinstall --no-deps $(WHEEL)
	touch $@

# The suite again on the oldest JAX that pyproject.toml claims, less the tests marked slow
# (which `make test` runs). .ci/run leaves it out: with make test it would not fit in 20 minutes
# on 2 cores.
test-oldest: $(OLDEST_VENV)/.installed
	TPUSTRAT_TEST_INSTALLED=1 $(OLDEST_VENV)/bin/pytest -q -m "not slow" $(ARGS)

docs: $(DEPS)
	$(VENV)/bin/mkdocs build --strict
	@echo "built build/site/index.html"

format: $(DEPS)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(VENV)/.wheel $(VENV)/.bench
	$(PY) benchmarks/step_overhead.py $(BENCH_FLAGS)
	$(PY) benchmarks/collectives.py $(BENCH_FLAGS)
	$(PY) benchmarks/steps_per_run.py $(BENCH_FLAGS)
	$(PY) benchmarks/metrics.py $(BENCH_FLAGS)
	$(PY) benchmarks/input_pipeline.py $(BENCH_FLAGS)
	$(PY) benchmarks/checkpoint_save.py $(BENCH_FLAGS)
	$(PY) benchmarks/weight_update_sharding.py $(BENCH_FLAGS)
	$(PY) benchmarks/largest_model.py $(BENCH_FLAGS)
	$(PY) benchmarks/leaf_overhead.py $(BENCH_FLAGS)
	$(PY) benchmarks/defaults.py $(BENCH_FLAGS)
	$(PY) benchmarks/workloads.py $(BENCH_FLAGS)
	$(PY) benchmarks/scaling.py $(BENCH_FLAGS)

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build dist .pytest_cache .ruff_cache
