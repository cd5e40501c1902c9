"""Half-precision products in float32 on CPUs without fast half kernels (sensitivity/half_products).

The mode is forced with ``BITPLAN_HALF_PRODUCTS`` so the tests do not depend on this machine's
CPU; the results are compared with products computed in float32 by hand.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn

from bitplan.sensitivity import half_products as hp
from bitplan.sensitivity.analyzer import analyze
from bitplan.sensitivity.data import CalibData
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.metrics import forward_output
from tests.helpers import VOCAB_SIZE, tiny_hf_config
from tests.sensitivity._data_fixtures import loaded

BF16_TOL = {"rtol": 1e-2, "atol": 1e-3}  # a few bfloat16 roundings


@pytest.fixture
def forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hp.ENV, "float32")


def _linear(dtype: torch.dtype = torch.bfloat16, rows: int = 300) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(64, rows).to(dtype)


@pytest.mark.parametrize("dtype", hp.HALF_DTYPES)
@pytest.mark.parametrize("chunk", [hp.CHUNK_ELEMENTS, 64 * 7, 1])
def test_linear_forward_and_backward_equal_float32_products(
    forced: None, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, chunk: int
) -> None:
    monkeypatch.setattr(hp, "CHUNK_ELEMENTS", chunk)  # 7 weight rows a chunk, or one
    lin = _linear(dtype)
    x = torch.randn(3, 5, 64).to(dtype).requires_grad_()
    w32, b32 = (t.detach().float().requires_grad_() for t in (lin.weight, lin.bias))
    x32 = x.detach().float().requires_grad_()
    want = F.linear(x32, w32, b32)
    with hp.float32_products(lin):
        got = lin(x)
    assert got.dtype == dtype and got.shape == (3, 5, 300)
    torch.testing.assert_close(got.float(), want.to(dtype).float(), **BF16_TOL)
    grad = torch.randn(3, 5, 300)
    got.backward(grad.to(dtype))
    want.backward(grad.to(dtype).float())
    for half, full in ((x, x32), (lin.weight, w32), (lin.bias, b32)):
        assert half.grad is not None and full.grad is not None
        assert half.grad.dtype == dtype
        torch.testing.assert_close(half.grad.float(), full.grad.to(dtype).float(), **BF16_TOL)


def test_linear_arguments_are_read_by_name_too(forced: None) -> None:
    lin = _linear(rows=64)  # a square weight: input and weight swapped would not fail loudly
    x = torch.randn(64, 64).to(torch.bfloat16)
    want = F.linear(x.float(), lin.weight.float(), lin.bias.float()).to(torch.bfloat16)
    with hp.float32_products(lin):
        calls = [
            F.linear(weight=lin.weight, input=x, bias=lin.bias),
            F.linear(x, bias=lin.bias, weight=lin.weight),
            F.linear(x, lin.weight, lin.bias),
        ]
    for got in calls:
        torch.testing.assert_close(got, want, **BF16_TOL)


def test_autograd_keeps_the_half_tensors_not_float32_copies(forced: None) -> None:
    """What backward holds on to: the half input and weight (a float32 copy of every weight
    would double fisher's memory)."""
    lin = _linear()
    x = torch.randn(4, 64).to(torch.bfloat16).requires_grad_()
    saved: list[torch.dtype] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), hp.float32_products(lin):
        lin(x).float().sum().backward()
    assert saved and set(saved) == {torch.bfloat16}


def test_other_products_are_computed_in_float32_and_rounded_back(forced: None) -> None:
    lin = _linear()
    a, b = torch.randn(2, 8, 16), torch.randn(2, 16, 4)
    ah, bh = a.to(torch.bfloat16), b.to(torch.bfloat16)
    with hp.float32_products(lin):
        results = [ah @ bh, torch.matmul(ah, bh), torch.bmm(ah, bh), ah[0].mm(bh[0])]
        bias = torch.zeros(4, dtype=torch.bfloat16)
        results.append(torch.addmm(bias, ah[0], bh[0]))
        with pytest.raises(RuntimeError):  # mixed dtypes fail as they do natively
            ah @ b
    want = (ah.float() @ bh.float()).to(torch.bfloat16)
    for got in results:
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want if got.dim() == 3 else want[0], **BF16_TOL)


def test_float32_cuda_less_modules_and_native_mode_are_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[Any] = []
    real = hp._Float32Linear.apply
    monkeypatch.setattr(hp._Float32Linear, "apply", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(2, 64)
    monkeypatch.setenv(hp.ENV, "float32")
    with hp.float32_products(_linear(torch.float32)):  # a float32 model: nothing to route
        _linear(torch.float32)(x)
    assert hp.half_dtype_of(_linear(torch.float32)) is None and not calls
    monkeypatch.setenv(hp.ENV, "native")
    with hp.float32_products(_linear()):
        _linear()(x.to(torch.bfloat16))
    assert not calls
    monkeypatch.setenv(hp.ENV, "float32")
    with hp.float32_products(_linear()):
        _linear()(x.to(torch.bfloat16))
        with hp.float32_products(_linear()):  # nested: routed once, by the outer context
            _linear()(x.to(torch.bfloat16))
    assert len(calls) == 2


def test_auto_measures_once_and_a_bad_setting_is_an_input_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(hp.ENV, "auto")
    hp._measured_slow.cache_clear()
    timings = iter([0.001, 0.001, 0.001, 0.1, 0.1, 0.1])  # float32 three times, then bfloat16
    threads_seen: list[int] = []

    def timed(fn: object) -> float:
        threads_seen.append(torch.get_num_threads())
        return min(next(timings) for _ in "abc")

    monkeypatch.setattr(hp, "_best_seconds", timed)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert hp.slow_half_products(torch.bfloat16) is True
        assert torch.get_num_threads() == 2  # put back after the probe
    finally:
        torch.set_num_threads(before)
    assert threads_seen == [1, 1]  # one thread: a busy machine cannot blur the comparison
    assert hp.slow_half_products(torch.bfloat16) is True  # cached: the timings are not read again
    assert hp.slow_half_products(torch.float32) is False
    hp._measured_slow.cache_clear()
    monkeypatch.setenv(hp.ENV, "fast")
    with pytest.raises(InputError, match="auto, float32 or native"):
        hp.slow_half_products(torch.bfloat16)


def _bf16_llama() -> Any:
    torch.manual_seed(0)
    module = tf.LlamaForCausalLM(tiny_hf_config("llama")).to(torch.bfloat16).eval()
    return loaded(module, "text-generation")


def _calib() -> CalibData:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB_SIZE, (6, 12), generator=gen)
    return CalibData({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None, "calib")


@pytest.mark.parametrize("method", ["fisher", "layer"])
def test_a_bf16_llama_scores_alike_with_float32_products(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    model, calib = _bf16_llama(), _calib()
    monkeypatch.setenv(hp.ENV, "native")
    first = next(calib.batches(2))
    native_logits = forward_output(model, first)
    native = analyze(model, calib, method=method, formats=["int8", "int4", "int2"], batch_size=3)
    monkeypatch.setenv(hp.ENV, "float32")
    routed_logits = forward_output(model, first)
    routed = analyze(model, calib, method=method, formats=["int8", "int4", "int2"], batch_size=3)
    assert routed_logits.dtype == torch.bfloat16
    torch.testing.assert_close(routed_logits, native_logits, rtol=0.05, atol=0.05)
    assert list(routed["layer"]) == list(native["layer"])
    torch.testing.assert_close(
        torch.tensor(routed["error"].to_numpy()),
        torch.tensor(native["error"].to_numpy()),
        rtol=0.1,
        atol=1e-6,
    )
