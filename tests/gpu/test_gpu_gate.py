"""The ``gpu`` marker's gate in ``tests/conftest.py``: skip with a reason without CUDA, fail
instead under ``BITPLAN_REQUIRE_GPU=1``, and leave unmarked tests alone. These run everywhere
(they are not marked ``gpu``): CUDA's absence is simulated."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest
import torch

from tests.conftest import cuda_missing, gpu_required, no_gpu, pytest_runtest_setup


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, False),
        ({"BITPLAN_REQUIRE_GPU": ""}, False),
        ({"BITPLAN_REQUIRE_GPU": "0"}, False),
        ({"BITPLAN_REQUIRE_GPU": "1"}, True),
        ({"BITPLAN_REQUIRE_GPU": "true"}, True),
        ({"BITPLAN_REQUIRE_GPU": " Yes "}, True),
    ],
)
def test_gpu_required_reads_its_variable(environ: dict[str, str], expected: bool) -> None:
    assert gpu_required(environ) is expected


def test_a_missing_gpu_skips_with_its_reason() -> None:
    with pytest.raises(pytest.skip.Exception, match="no CUDA device.*a CPU build"):
        no_gpu("a CPU build", environ={})


def test_a_missing_gpu_fails_when_the_gpu_tests_must_run() -> None:
    with pytest.raises(pytest.fail.Exception, match="a CPU build.*BITPLAN_REQUIRE_GPU=1"):
        no_gpu("a CPU build", environ={"BITPLAN_REQUIRE_GPU": "1"})


def _item(marked: bool) -> pytest.Item:
    marker = pytest.mark.gpu.mark if marked else None
    return cast(pytest.Item, SimpleNamespace(get_closest_marker=lambda name: marker))


def _without_cuda(monkeypatch: pytest.MonkeyPatch, build: str | None = "12.4") -> None:
    """A torch built for CUDA ``build`` (None: a CPU build) that sees no device."""
    monkeypatch.setattr(torch.version, "cuda", build)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_the_setup_hook_skips_a_marked_test_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_cuda(monkeypatch)
    monkeypatch.delenv("BITPLAN_REQUIRE_GPU", raising=False)
    assert cuda_missing() == f"torch {torch.__version__} (CUDA 12.4) sees no CUDA device"
    with pytest.raises(pytest.skip.Exception, match="sees no CUDA device"):
        pytest_runtest_setup(_item(marked=True))
    pytest_runtest_setup(_item(marked=False))  # unmarked: runs anyway


def test_the_setup_hook_fails_a_marked_test_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_cuda(monkeypatch)
    monkeypatch.setenv("BITPLAN_REQUIRE_GPU", "1")
    with pytest.raises(pytest.fail.Exception, match="the gpu tests must run"):
        pytest_runtest_setup(_item(marked=True))


def test_a_cpu_build_of_torch_is_named_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_cuda(monkeypatch, build=None)
    assert cuda_missing() == f"torch {torch.__version__} is a build without CUDA"


def test_a_marked_test_runs_where_cuda_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("BITPLAN_REQUIRE_GPU", "1")
    assert cuda_missing() is None
    pytest_runtest_setup(_item(marked=True))  # neither skips nor fails
