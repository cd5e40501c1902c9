"""Fixtures of the CUDA tests: each tiny model loaded twice, on the CPU and on CUDA, with the
calibration data both see, and a model cache without tables for whole jobs.

Only tests marked ``gpu`` use them, and those are skipped (or failed, see ``tests/conftest.py``)
before any fixture runs where there is no CUDA device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bitplan.sensitivity.data import CalibData, load_calibration
from bitplan.sensitivity.models import LoadedModel, load_model
from tests.helpers import VOCAB_SIZE, write_tiny_hf_model

# The models every comparison runs on: a CNN (convolutions: TF32 on CUDA), a small LM with a
# tied head, and a Hugging Face LLaMA (rotary embeddings, SDPA attention, padding).
CASES = ("digits-cnn", "tiny-lm", "tiny-llama")
# Calibration samples per builtin model: enough for stable statistics, seconds on the CPU.
_BUILTIN_SAMPLES = {"digits-cnn": 256, "tiny-lm": 32}


@dataclass(frozen=True)
class Case:
    """One model on both devices (equal weights) and its calibration data (on the CPU)."""

    name: str
    cpu: LoadedModel
    cuda: LoadedModel
    calib: CalibData


def token_calib(n: int = 16, length: int = 16) -> CalibData:
    """Random token ids of the tiny Hugging Face models; every other sample padded at its end
    (``attention_mask`` 0 there), so masks travel through every method."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB_SIZE, (n, length), generator=gen)  # (n, length)
    mask = torch.ones(n, length, dtype=torch.int64)
    mask[::2, length // 2 :] = 0
    ids[mask == 0] = 0
    return CalibData(inputs={"input_ids": ids, "attention_mask": mask}, labels=None, sha256="t")


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaMA causal LM (hidden 32, 2 blocks) as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    return write_tiny_hf_model(folder, "llama", task="text-generation")


class Cases:
    """``cases[name]``: a :class:`Case`, loaded on first use and shared by the session (methods
    restore every weight they change)."""

    def __init__(self, cache_dir: Path, llama: Path) -> None:
        self._cache_dir, self._llama = cache_dir, llama
        self._loaded: dict[str, Case] = {}

    def _load(self, name: str, device: str) -> LoadedModel:
        ref = str(self._llama) if name == "tiny-llama" else f"builtin:{name}"
        return load_model(ref, device=device, cache_dir=self._cache_dir)

    def __getitem__(self, name: str) -> Case:
        if name not in self._loaded:
            cpu, cuda = self._load(name, "cpu"), self._load(name, "cuda")
            if name == "tiny-llama":
                calib = token_calib()
            else:
                calib = load_calibration("builtin", cpu, max_samples=_BUILTIN_SAMPLES[name])
            self._loaded[name] = Case(name, cpu, cuda, calib)
        return self._loaded[name]


@pytest.fixture(scope="session")
def cases(bitplan_cache_dir: Path, llama_folder: Path) -> Cases:
    return Cases(bitplan_cache_dir, llama_folder)


def cache_without_tables(root: Path, trained: Path) -> Path:
    """A ``BITPLAN_CACHE_DIR`` under ``root`` with no sensitivity tables but the builtin models
    trained in the cache ``trained``: a table cached by a CPU run of the same job must not stand
    in for a CUDA one (the cache key does not name the device)."""
    (trained / "builtin").mkdir(parents=True, exist_ok=True)
    cache = root / "cache"
    cache.mkdir()
    (cache / "builtin").symlink_to(trained / "builtin", target_is_directory=True)
    return cache
