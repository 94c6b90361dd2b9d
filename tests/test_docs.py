"""The examples in the docstrings run as written: every module under src/gaqat whose source
has a ``>>>`` line is collected here, so a new example is tested without a line added to
this file. Examples run on CPU in a temporary working directory."""

import doctest
import importlib
from pathlib import Path

import pytest

import gaqat

PACKAGE = Path(gaqat.__file__).parent


def modules_with_examples() -> list[str]:
    """The dotted names of the modules whose source holds a ``>>>`` line."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if ">>>" in path.read_text(encoding="utf-8"):
            parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = modules_with_examples()


def test_the_examples_are_found():
    assert "gaqat.progress" in MODULES  # the finder walks the installed package


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    tests = [t for t in doctest.DocTestFinder().find(module, name) if t.examples]
    assert tests, f"{name} has a '>>>' line, but no docstring example doctest can run"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
