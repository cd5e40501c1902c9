"""The runtime packages (the ``runtimes`` extra) in tests: missing, tests FAIL and say how to
install them.

Each export is checked by its runtime's own loader, so these packages are test dependencies
(``make`` installs them); a skip would hide that no export was ever loaded. Two ways in:

- :func:`require_runtime` inside a test imports the package or fails the test;
- a test module that imports a runtime at its top cannot even be collected without it (an
  ImportError there stops the whole run): ``tests/search/conftest.py`` collects such a module
  as a :class:`MissingRuntime` file instead, whose one test fails with the same message.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType

import pytest

__all__ = ["MissingRuntime", "missing_message", "require_runtime", "runtime_installed"]

# pip names of the import names whose pip name differs.
_PIP_NAMES = {"compressed_tensors": "compressed-tensors", "llama_cpp": "llama-cpp-python"}


def missing_message(package: str) -> str:
    """How to install ``package``, for a failing test."""
    name = _PIP_NAMES.get(package, package)
    compiles = " (llama-cpp-python compiles llama.cpp: minutes)" if package == "llama_cpp" else ""
    return (
        f"{name} is not installed, so no export can be checked with its runtime: "
        f"pip install 'bitplan[runtimes]' (make installs it){compiles}"
    )


def runtime_installed(package: str) -> bool:
    """Whether ``package`` imports."""
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True


def require_runtime(package: str) -> ModuleType:
    """``package`` imported; missing, the calling test FAILS with how to install it."""
    if not runtime_installed(package):
        pytest.fail(missing_message(package), pytrace=False)
    return importlib.import_module(package)


class _MissingRuntimeItem(pytest.Item):
    def __init__(self, *, package: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.package = package

    def runtest(self) -> None:
        pytest.fail(missing_message(self.package), pytrace=False)

    def reportinfo(self) -> tuple[str, int | None, str]:
        return str(self.path), None, f"{self.path.name}: needs {self.package}"


class MissingRuntime(pytest.File):
    """A test module that needs ``package`` to be imported, collected without importing it: one
    test that fails with how to install the package."""

    def __init__(self, *, package: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.package = package

    def collect(self) -> Iterator[pytest.Item]:
        yield _MissingRuntimeItem.from_parent(
            self, name=f"needs_{self.package}", package=self.package
        )
