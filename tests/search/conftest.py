"""Test modules of the runtime targets import their runtime at the top; without it each is
collected as one failing test that says how to install it (:mod:`tests.runtimes`), so the rest
of the suite still runs and nothing is skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runtimes import MissingRuntime, runtime_installed

# Test module -> the runtime packages it imports at its top.
_NEEDS = {
    "test_compressed_tensors_target.py": ("compressed_tensors",),
    "test_gguf_target.py": ("gguf",),
    "test_torchao_target.py": ("torchao",),
}


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.File | None:
    missing = [p for p in _NEEDS.get(module_path.name, ()) if not runtime_installed(p)]
    if not missing:
        return None  # pytest's own Module
    file: pytest.File = MissingRuntime.from_parent(parent, path=module_path, package=missing[0])
    return file
