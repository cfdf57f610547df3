"""Every Example in the library's docstrings runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import jax
import numpy as np
import pytest

import tpustrat as ts

MODULES = sorted(
    name
    for _, name, _ in pkgutil.iter_modules(ts.__path__, prefix="tpustrat.")
    if name not in ("tpustrat._cluster", "tpustrat._launch")  # they start processes
)


@pytest.mark.parametrize("name", MODULES)
def test_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    globs = {"ts": ts, "np": np, "jax": jax, **vars(module)}
    for test in finder.find(module, name, globs=globs):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring examples failed in {name}"
