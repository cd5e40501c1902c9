"""Fixtures shared by every test package: an isolated model cache and tiny models.

The session's ``BITPLAN_CACHE_DIR`` points into pytest's own cache folder, so tests never touch
the user's cache, and the builtin models are trained once per checkout rather than once per run
(a trained model is keyed by its recipe version, so a changed recipe retrains).

Tests marked ``gpu`` run where torch sees a CUDA device and skip elsewhere, saying why (``pytest
-ra`` lists the reason), except under ``BITPLAN_REQUIRE_GPU=1``, where a missing device is a
failure: a run on a GPU machine must never pass by skipping the CUDA tests (``pytest -m gpu``
runs just those).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NoReturn

import pytest
import torch

from bitplan.sensitivity.models import LoadedModel, load_model
from tests.helpers import write_tiny_hf_model

REQUIRE_GPU_ENV = "BITPLAN_REQUIRE_GPU"


def gpu_required(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` asks for the ``gpu`` tests to run (``BITPLAN_REQUIRE_GPU=1``)."""
    return environ.get(REQUIRE_GPU_ENV, "").strip().lower() in ("1", "true", "yes")


def cuda_missing() -> str | None:
    """Why torch cannot run on a CUDA device here, or None when it can (ROCm builds serve
    ``cuda`` too)."""
    if torch.cuda.is_available():
        return None
    build = torch.version.cuda or getattr(torch.version, "hip", None)
    if build is None:
        return f"torch {torch.__version__} is a build without CUDA"
    return f"torch {torch.__version__} (CUDA {build}) sees no CUDA device"


def no_gpu(reason: str, *, environ: Mapping[str, str]) -> NoReturn:
    """Skip a ``gpu`` test, saying why; under ``BITPLAN_REQUIRE_GPU=1`` fail it instead."""
    message = f"no CUDA device for this gpu test: {reason}"
    if gpu_required(environ):
        pytest.fail(f"{message} ({REQUIRE_GPU_ENV}=1: the gpu tests must run)", pytrace=False)
    pytest.skip(f"{message} (set {REQUIRE_GPU_ENV}=1 to make this a failure)")


@pytest.hookimpl(tryfirst=True)  # before any fixture of the test is set up
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None:
        reason = cuda_missing()
        if reason is not None:
            no_gpu(reason, environ=os.environ)


@pytest.fixture(scope="session")
def bitplan_cache_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A model cache that survives between runs (pytest's cache), or a temp dir without one."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("bitplan-models"))
    return tmp_path_factory.mktemp("bitplan-models")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(bitplan_cache_dir: Path) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITPLAN_CACHE_DIR", str(bitplan_cache_dir))
        yield


@pytest.fixture(scope="session")
def digits_model(bitplan_cache_dir: Path) -> LoadedModel:
    """``builtin:digits-cnn`` on the CPU; shared, so restore anything you change in place."""
    return load_model("builtin:digits-cnn", device="cpu", cache_dir=bitplan_cache_dir)


@pytest.fixture(scope="session")
def tiny_lm_model(bitplan_cache_dir: Path) -> LoadedModel:
    """``builtin:tiny-lm`` on the CPU; shared, so restore anything you change in place."""
    return load_model("builtin:tiny-lm", device="cpu", cache_dir=bitplan_cache_dir)


@pytest.fixture
def tiny_hf_model(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``tiny_hf_model("gpt2", task="text-generation", dtype=torch.bfloat16)`` → folder.

    Each call writes a fresh folder under the test's ``tmp_path``; keyword arguments go to
    :func:`tests.helpers.write_tiny_hf_model`.
    """
    count = 0

    def make(
        model_type: str = "bert",
        *,
        task: str = "feature-extraction",
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> Path:
        nonlocal count
        count += 1
        folder = tmp_path / f"hf-{model_type}-{count}"
        return write_tiny_hf_model(folder, model_type, task=task, dtype=dtype, **kwargs)

    return make
