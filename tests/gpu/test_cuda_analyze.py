"""Sensitivity analysis on CUDA gives the CPU's tables: every method, a data-aware rounding and
the block-wise path, on the three tiny models of ``conftest.py``.

Each test computes one table on both devices (no table cache: the cache key does not name the
device) and compares them with the tolerances of :mod:`tests.gpu._compare`, which say why CUDA
is not bitwise the CPU. Each prints the worst relative deviation it saw (``pytest -rP`` shows
it), the figure the note on the CUDA path records.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from bitplan.sensitivity.analyzer import analyze
from bitplan.sensitivity.lazy_hf import load_skeleton
from bitplan.sensitivity.metrics import collect_reference, measure
from bitplan.sensitivity.models import LoadedModel, load_model
from tests.gpu._compare import (
    FISHER_MIN_SPEARMAN,
    GPTQ,
    TOLERANCES,
    assert_same_ranking,
    assert_tables_close,
    worst_deviation,
)
from tests.gpu.conftest import CASES, Case, Cases, token_calib

pytestmark = pytest.mark.gpu

# Every kind of format: integer per row and per group, asymmetric, fp8 (a float8 cast on the GPU).
FORMATS = ["int8", "int4-g32", "int2-g16-asym", "fp8-e4m3"]
BATCH = 32


def _table(model: LoadedModel, case: Case, method: str, formats: list[str]) -> pd.DataFrame:
    return analyze(model, case.calib, method=method, formats=formats, batch_size=BATCH, seed=0)


def _both(case: Case, method: str, formats: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    cpu = _table(case.cpu, case, method, formats)
    cuda = _table(case.cuda, case, method, formats)
    print(f"{case.name} {method}: worst relative deviation {worst_deviation(cpu, cuda):.2e}")
    return cpu, cuda


def test_the_cuda_model_is_on_cuda_and_in_its_checkpoint_dtype(cases: Cases) -> None:
    for name in CASES:
        case = cases[name]
        assert case.cuda.device.type == "cuda"
        for (pname, p), q in zip(
            case.cpu.module.named_parameters(), case.cuda.module.parameters(), strict=True
        ):
            assert q.is_cuda and q.dtype == p.dtype, pname
            assert torch.equal(q.cpu(), p), pname


@pytest.mark.parametrize("name", CASES)
def test_the_unchanged_model_measures_exactly_zero_on_cuda(cases: Cases, name: str) -> None:
    """Reference and measurement batch alike, so CUDA's outputs must repeat bitwise (e2e and the
    measured search rely on it: a quantized layer is the only change they may see)."""
    case = cases[name]
    reference = collect_reference(case.cuda, case.calib, batch_size=BATCH)
    assert measure(case.cuda, case.calib, reference)["error"] == 0.0


@pytest.mark.parametrize("method", ["weight", "layer", "e2e"])
@pytest.mark.parametrize("name", CASES)
def test_a_deterministic_method_gives_the_cpu_table(cases: Cases, name: str, method: str) -> None:
    cpu, cuda = _both(cases[name], method, FORMATS)
    assert_tables_close(cpu, cuda, TOLERANCES[method])


@pytest.mark.parametrize("name", CASES)
def test_fisher_on_cuda_ranks_the_rows_as_the_cpu_does(cases: Cases, name: str) -> None:
    cpu, cuda = _both(cases[name], "fisher", FORMATS)
    assert (cuda.method == "fisher").any()  # gradients reached layers on CUDA too
    assert_same_ranking(cpu, cuda, FISHER_MIN_SPEARMAN)


@pytest.mark.parametrize("method", ["layer", "weight"])
@pytest.mark.parametrize("name", CASES)
def test_gptq_rows_on_cuda_match_the_cpu(cases: Cases, name: str, method: str) -> None:
    """GPTQ's statistics are collected and its sweep runs on CUDA (``weight`` rescales its
    rounded rows through ``layer``'s ratio)."""
    cpu, cuda = _both(cases[name], method, ["int8", "int4-g32", "int4-g32+gptq"])
    rounded = cpu.format.str.endswith("+gptq")
    assert rounded.any()
    assert_tables_close(cpu[~rounded], cuda[~cuda.format.str.endswith("+gptq")], TOLERANCES[method])
    assert_tables_close(cpu[rounded], cuda[cuda.format.str.endswith("+gptq")], GPTQ)


def test_blockwise_analysis_on_cuda_gives_the_whole_models_cpu_table(llama_folder: Path) -> None:
    """The skeleton's parts are read from disk straight to CUDA, its buffers stay where
    transformers built them; the table is the whole model's on the CPU."""
    formats = ["int8", "int4-g32", "int2-g16-asym", "int4-g32+gptq"]
    calib = token_calib()
    whole = load_model(str(llama_folder), device="cpu")
    skeleton = load_skeleton(str(llama_folder), device="cuda")
    assert skeleton.device.type == "cuda"
    cpu = analyze(whole, calib, method="layer", formats=formats, batch_size=4)
    cuda = analyze(skeleton, calib, method="layer", formats=formats, batch_size=4)
    print(f"tiny-llama blockwise: worst relative deviation {worst_deviation(cpu, cuda):.2e}")
    rounded = cpu.format.str.endswith("+gptq")
    cuda_rounded = cuda.format.str.endswith("+gptq")
    assert_tables_close(cpu[~rounded], cuda[~cuda_rounded], TOLERANCES["layer"])
    assert_tables_close(cpu[rounded], cuda[cuda_rounded], GPTQ)
    assert all(p.is_meta for p in skeleton.module.parameters())  # every part released again
