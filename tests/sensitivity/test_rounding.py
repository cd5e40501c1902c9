"""The rounding contract: every method's codes are exactly what the format stores, ``rtn`` is
round-to-nearest bit for bit, and bad requests fail with a message that says the fix."""

from __future__ import annotations

import math

import pytest
import torch

from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import (
    QuantCodes,
    QuantFormat,
    dequantize,
    parse_format,
    quantize_codes,
    tensor_bytes,
)
from bitplan.sensitivity.rounding import ROUNDINGS, RoundingError, layer_error, round_codes
from tests.sensitivity._rounding_fixtures import (
    correlated_inputs,
    gaussian,
    gram_of,
    heavy_tailed,
    weight_delta,
)

# Short last groups (20 = 8+8+4 = 6+6+6+2), per-row scales, a group wider than the row.
INT_FORMATS = ("int4-g8", "int3-g8-asym", "int2-g6-asym", "int8", "int4-asym", "int5-g64")
ROWS, COLS = 7, 20


def _weights(seed: int) -> torch.Tensor:
    w = heavy_tailed(seed, ROWS, COLS)
    w[1] = 0.0  # an all-zero row: scale 1 by DESIGN §3
    w[2] = 0.25  # a constant row
    return w


def _stored_bytes(codes: QuantCodes, fmt: QuantFormat) -> int:
    """Bytes of what the codes actually hold, by DESIGN §3's layout."""
    bits = codes.q.numel() * fmt.bits + codes.scale.numel() * 16
    if codes.zero is not None:
        bits += codes.zero.numel() * fmt.bits
    return math.ceil(bits / 8)


@pytest.mark.parametrize("name", INT_FORMATS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_codes_are_exactly_representable(rounding: str, name: str) -> None:
    fmt = parse_format(name)
    w = _weights(0)
    before = w.clone()
    h = gram_of(correlated_inputs(1, 64, COLS))
    codes = round_codes(w, fmt, rounding, gram=h)
    n_groups = fmt.n_groups(ROWS, COLS) // ROWS
    assert torch.equal(w, before), "the input matrix was modified"
    assert codes.q.dtype == torch.int16 and tuple(codes.q.shape) == (ROWS, COLS)
    qmax = 2 ** (fmt.bits - 1) - 1
    lo, hi = (-qmax, qmax) if fmt.symmetric else (0, 2**fmt.bits - 1)
    assert int(codes.q.min()) >= lo and int(codes.q.max()) <= hi
    assert codes.scale.dtype == torch.float16 and tuple(codes.scale.shape) == (ROWS, n_groups)
    assert bool(torch.isfinite(codes.scale).all()) and bool((codes.scale > 0).all())
    if fmt.symmetric:
        assert codes.zero is None
    else:
        assert codes.zero is not None and codes.zero.dtype == torch.int16
        assert tuple(codes.zero.shape) == (ROWS, n_groups)
        assert int(codes.zero.min()) >= 0 and int(codes.zero.max()) <= 2**fmt.bits - 1
    dq = dequantize(codes, fmt, COLS)
    assert tuple(dq.shape) == (ROWS, COLS) and bool(torch.isfinite(dq).all())
    assert bool((dq[1] == 0).all()), "an all-zero row must stay zero"
    assert _stored_bytes(codes, fmt) == tensor_bytes(fmt, ROWS, COLS)


@pytest.mark.parametrize("name", [*INT_FORMATS, "fp8-e4m3", "q4_0", "q8_0", "q4_k"])
def test_rtn_is_quantize_codes_bit_for_bit(name: str) -> None:
    fmt = parse_format(name)
    w = gaussian(3, 4, 256)
    got, want = round_codes(w, fmt, "rtn"), quantize_codes(w, fmt)
    assert got.q.dtype == want.q.dtype
    assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8))
    assert torch.equal(got.scale, want.scale)
    assert (got.zero is None) == (want.zero is None)
    if got.zero is not None and want.zero is not None:
        assert torch.equal(got.zero, want.zero)


@pytest.mark.parametrize("name", ["fp8-e4m3", "fp16", "bf16", "q4_0", "q4_k", "q8_0"])
@pytest.mark.parametrize("rounding", [r for r in ROUNDINGS if r != "rtn"])
def test_only_int_formats_take_other_roundings(rounding: str, name: str) -> None:
    w = gaussian(0, 2, 256)
    with pytest.raises(RoundingError, match=f"{name} supports only rtn") as info:
        round_codes(w, parse_format(name), rounding, gram=torch.eye(256))
    assert isinstance(info.value, InputError)


def test_unknown_rounding_lists_what_is_accepted() -> None:
    with pytest.raises(RoundingError, match="unknown rounding 'nearest'; accepted: rtn, gptq"):
        round_codes(gaussian(0, 2, 8), parse_format("int4"), "nearest")


@pytest.mark.parametrize(
    ("rounding", "kwargs", "message"),
    [
        ("gptq", {}, "gptq needs gram"),
        ("awq", {}, "awq needs gram"),
        ("awq", {"gram": torch.eye(8), "act_scale": torch.ones(8)}, "not both"),
        ("gptq", {"gram": torch.eye(7)}, r"expected \(8, 8\)"),
        ("awq", {"gram": torch.full((8, 8), float("nan"))}, "non-finite"),
        ("awq", {"act_scale": torch.ones(7)}, r"expected \(8,\)"),
        ("awq", {"act_scale": -torch.ones(8)}, "non-negative"),
        ("gptq", {"gram": -torch.eye(8)}, "not positive semi-definite"),
    ],
)
def test_bad_statistics_say_what_is_needed(
    rounding: str, kwargs: dict[str, torch.Tensor], message: str
) -> None:
    with pytest.raises(RoundingError, match=message):
        round_codes(gaussian(0, 3, 8), parse_format("int4-g4"), rounding, **kwargs)


@pytest.mark.parametrize("shape", [(2, 3, 4), (0, 8), (2, 0)])
def test_a_matrix_is_required(shape: tuple[int, ...]) -> None:
    with pytest.raises(RoundingError, match=r"non-empty \[rows, cols\] matrix"):
        round_codes(torch.ones(shape), parse_format("int4"), "hqq")


@pytest.mark.parametrize("rounding", ["rtn", "hqq"])
def test_data_free_roundings_ignore_statistics(rounding: str) -> None:
    fmt = parse_format("int3-g8-asym")
    w = _weights(4)
    plain = round_codes(w, fmt, rounding)
    given = round_codes(w, fmt, rounding, gram=gram_of(correlated_inputs(0, 32, COLS)))
    assert torch.equal(plain.q, given.q) and torch.equal(plain.scale, given.scale)


def test_layer_error_is_the_relative_output_error() -> None:
    fmt = parse_format("int3-g8")
    w = gaussian(5, 6, COLS)
    x = correlated_inputs(6, 50, COLS)  # (samples, cols): the layer computes x @ wᵀ
    codes = round_codes(w, fmt, "rtn")
    direct = float((x @ weight_delta(w, codes, fmt).T).square().sum() / (x @ w.T).square().sum())
    assert layer_error(w, codes, fmt, gram_of(x)) == pytest.approx(direct, rel=1e-5)
    assert direct > 0
    zero = torch.zeros(6, COLS)
    assert layer_error(zero, quantize_codes(zero, fmt), fmt, gram_of(x)) == 0.0


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_rows_round_independently(rounding: str) -> None:
    # Callers round large weights a chunk of rows at a time; that must change nothing.
    fmt = parse_format("int3-g8-asym")
    w = _weights(7)
    h = gram_of(correlated_inputs(8, 64, COLS))
    whole = round_codes(w, fmt, rounding, gram=h)
    parts = [round_codes(w[a:b], fmt, rounding, gram=h) for a, b in ((0, 3), (3, 4), (4, ROWS))]
    assert torch.equal(whole.q, torch.cat([p.q for p in parts]))
    assert torch.equal(whole.scale, torch.cat([p.scale for p in parts]))
    assert whole.zero is not None
    assert torch.equal(whole.zero, torch.cat([p.zero for p in parts if p.zero is not None]))


def test_a_format_named_with_its_rounding() -> None:
    w = _weights(9)
    h = gram_of(correlated_inputs(10, 64, COLS))
    named = round_codes(w, parse_format("int4-g8+gptq"), "gptq", gram=h)
    plain = round_codes(w, parse_format("int4-g8"), "gptq", gram=h)
    assert torch.equal(named.q, plain.q) and torch.equal(named.scale, plain.scale)
    with pytest.raises(RoundingError, match=r"int4-g8\+gptq is rounded by gptq, not hqq"):
        round_codes(w, parse_format("int4-g8+gptq"), "hqq")
