"""Every docstring example in the package runs (doctest), and every public name of
``meanablate`` has a docstring with a runnable example."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import meanablate

# Modules whose import needs an optional dependency are skipped when it is missing.
MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(meanablate.__path__, "meanablate.")
    if "__main__" not in m.name
)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        pytest.skip(f"{name} needs {exc.name}")
    result = doctest.testmod(module, optionflags=FLAGS, verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} doctest failure(s) in {name} (see output)"


def _public():
    for name in meanablate.__all__:
        if name.startswith("__") or name == "metrics":
            continue
        obj = getattr(meanablate, name)
        if name == "report":  # the callable module: meanablate.report(...) is results.report
            from meanablate.results import report as obj
        yield name, obj


@pytest.mark.parametrize(("name", "obj"), list(_public()), ids=[n for n, _ in _public()])
def test_every_public_name_has_an_example(name, obj):
    doc = inspect.getdoc(obj) or ""
    assert len(doc.splitlines()) >= 3, f"meanablate.{name}: docstring too short"
    assert ">>>" in doc, f"meanablate.{name}: no runnable example in the docstring"
