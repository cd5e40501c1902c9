"""The reference arithmetic and byte accounting of DESIGN §3, checked against hand formulas."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitplan.sensitivity import formats as F
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import (
    FormatError,
    dequantize,
    fake_quantize,
    parse_format,
    parse_formats,
    quantize_codes,
    tensor_bytes,
)

INT_NAMES = st.builds(
    lambda b, g, asym: f"int{b}" + (f"-g{g}" if g else "") + ("-asym" if asym else ""),
    st.sampled_from(F.ALLOWED_BITS),
    st.one_of(st.none(), st.integers(1, 512)),
    st.booleans(),
)
ALL_NAMES = st.one_of(
    INT_NAMES,
    st.sampled_from(["fp32", "bf16", "fp16", "fp8-e4m3"]),
    st.sampled_from(list(F.GGML_TYPES)),
)


def _matrix(seed: int, rows: int, cols: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen)


def _rel_err(w: torch.Tensor, name: str) -> float:
    q = fake_quantize(w, parse_format(name))
    return float(((q - w) ** 2).sum() / (w**2).sum())


@given(ALL_NAMES)
def test_name_round_trip(name: str) -> None:
    fmt = parse_format(name)
    assert fmt.name == name
    assert parse_format(fmt.name.upper()) == fmt


@pytest.mark.parametrize("bad", ["int7", "int4-g0", "int4-g-3", "fp4", "int", "int4-asym-g8", ""])
def test_bad_names_list_what_is_accepted(bad: str) -> None:
    with pytest.raises(FormatError, match="accepted: fp32, bf16, fp16, fp8-e4m3") as info:
        parse_format(bad)
    said, _ = str(info.value).split("; accepted:")
    if bad:  # the name once, then what is accepted
        assert said.count(bad) == 1, said


def test_bad_names_list_the_llama_cpp_formats_too() -> None:
    with pytest.raises(FormatError, match="llama.cpp block format: q8_0, .*, q2_k$"):
        parse_format("q4_z")


def test_format_error_is_input_error() -> None:
    assert issubclass(FormatError, InputError)


def test_parse_formats_rejects_duplicates_and_empty() -> None:
    assert [f.name for f in parse_formats("int8, int4-g128")] == ["int8", "int4-g128"]
    with pytest.raises(FormatError, match="listed twice: int8"):
        parse_formats("int8,int8")
    int8 = parse_format("int8")
    assert parse_formats([int8, "INT4"]) == [int8, parse_format("int4")]
    with pytest.raises(FormatError, match="listed twice: int8"):
        parse_formats([int8, "int8"])
    with pytest.raises(FormatError, match="no format"):
        parse_formats(" , ")


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(1, 8),
    cols=st.integers(16, 200),
    group=st.sampled_from([None, 16, 32, 64]),
    asym=st.booleans(),
)
def test_error_falls_as_bits_rise(
    seed: int, rows: int, cols: int, group: int | None, asym: bool
) -> None:
    w = _matrix(seed, rows, cols)
    suffix = (f"-g{group}" if group else "") + ("-asym" if asym else "")
    errors = [_rel_err(w, f"int{b}{suffix}") for b in F.ALLOWED_BITS]
    assert all(hi <= lo * (1 + 1e-6) for lo, hi in zip(errors, errors[1:], strict=False)), errors


def test_symmetric_matches_hand_formula_with_short_last_group() -> None:
    w = _matrix(0, 3, 10)  # groups of 4, 4, 2
    fmt = parse_format("int3-g4")
    got = fake_quantize(w, fmt)
    for r in range(3):
        for start in (0, 4, 8):
            g = w[r, start : start + 4]
            scale = (g.abs().max() / 3).to(torch.float16).float()
            expect = torch.clamp(torch.round(g / scale), -3, 3) * scale
            assert torch.equal(got[r, start : start + 4], expect)


def test_asymmetric_matches_hand_formula() -> None:
    w = _matrix(1, 2, 7).abs() + 0.5  # all positive: the case asymmetric grids are for
    fmt = parse_format("int2-g3-asym")
    got = fake_quantize(w, fmt)
    for r in range(2):
        for start in (0, 3, 6):
            g = w[r, start : start + 3]
            scale = ((g.max() - g.min()) / 3).to(torch.float16).float()
            scale = scale if scale != 0 else torch.tensor(1.0)
            zp = torch.clamp(torch.round(-g.min() / scale), 0, 3)
            q = torch.clamp(torch.round(g / scale) + zp, 0, 3)
            assert torch.allclose(got[r, start : start + 3], (q - zp) * scale, rtol=0, atol=0)


def test_asymmetric_beats_symmetric_on_one_sided_data() -> None:
    w = torch.rand(16, 128, generator=torch.Generator().manual_seed(3))
    assert _rel_err(w, "int3-g32-asym") < _rel_err(w, "int3-g32")


def test_all_zero_group_stays_zero_with_scale_one() -> None:
    w = torch.zeros(2, 8)
    w[1, 4:] = torch.tensor([1.0, -2.0, 0.5, 0.25])
    for name in ("int4-g4", "int4-g4-asym"):
        codes = quantize_codes(w, parse_format(name))
        assert codes.scale[0].float().tolist() == [1.0, 1.0]
        assert torch.equal(fake_quantize(w, parse_format(name))[0], torch.zeros(8))


def test_constant_group() -> None:
    w = torch.full((1, 6), 0.3)
    # Symmetric: scale = c / qmax, so the constant survives up to fp16 rounding of the scale.
    assert torch.allclose(fake_quantize(w, parse_format("int4")), w, rtol=1e-3)
    # Asymmetric: max - min = 0, so the scale falls back to 1 (DESIGN §3): round(0.3) = 0.
    assert torch.equal(fake_quantize(w, parse_format("int4-asym")), torch.zeros(1, 6))
    w2 = torch.full((1, 6), 2.0)
    assert torch.equal(fake_quantize(w2, parse_format("int2-asym")), w2)


def test_one_column_rows_are_exact_up_to_scale_rounding() -> None:
    w = _matrix(2, 50, 1)
    got = fake_quantize(w, parse_format("int2"))
    assert torch.allclose(got, w, rtol=2e-3)


def test_fp8_matches_reference_and_never_nans() -> None:
    w = _matrix(4, 8, 33) * 1000
    got = fake_quantize(w, parse_format("fp8-e4m3"))
    scale = (w.abs().amax(dim=1, keepdim=True) / 448).to(torch.float16).float()
    expect = torch.clamp(w / scale, -448, 448).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(got, expect)
    assert torch.isfinite(got).all()
    assert _rel_err(w, "fp8-e4m3") < 1e-3


def test_float_casts() -> None:
    w = _matrix(5, 4, 4)
    assert torch.equal(fake_quantize(w, parse_format("bf16")), w.bfloat16().float())
    assert torch.equal(fake_quantize(w, parse_format("fp32")), w)


def test_codes_round_trip_equals_fake_quant() -> None:
    w = _matrix(6, 5, 37)
    for name in ("int8", "int5-g16", "int3-g8-asym", "fp8-e4m3"):
        fmt = parse_format(name)
        assert torch.equal(dequantize(quantize_codes(w, fmt), fmt, 37), fake_quantize(w, fmt))


def test_writes_into_strided_out_and_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    w = _matrix(7, 12, 20)
    fmt = parse_format("int4-g8")
    expect = fake_quantize(w, fmt)
    storage = w.t().contiguous()  # (cols, rows): a transposed layout like transformers' Conv1D
    fake_quantize(storage.t(), fmt, out=storage.t())
    assert torch.equal(storage.t(), expect)
    monkeypatch.setattr(F, "_CHUNK_ELEMENTS", 40)  # 2 rows a chunk
    assert torch.equal(fake_quantize(w, fmt), expect)


def test_keeps_dtype_of_out() -> None:
    w = _matrix(8, 4, 16).bfloat16()
    assert fake_quantize(w, parse_format("int4")).dtype == torch.bfloat16


@given(rows=st.integers(1, 300), cols=st.integers(1, 5000), name=ALL_NAMES)
def test_bytes_formula(rows: int, cols: int, name: str) -> None:
    fmt = parse_format(name)
    numel = rows * cols
    if fmt.kind == "ggml":  # whole blocks of `group_size` weights, each a fixed byte count
        t = F.GGML_TYPES[name]
        if cols % t.block:
            with pytest.raises(FormatError, match="do not fit"):
                tensor_bytes(fmt, rows, cols)
            return
        expect = numel // t.block * t.type_size
    elif fmt.kind == "float":
        expect = numel * {"fp32": 4, "bf16": 2, "fp16": 2}[name]
    elif fmt.kind == "fp8":
        expect = numel + 2 * rows
    else:
        per_row = 1 if fmt.group_size is None else math.ceil(cols / fmt.group_size)
        ng = rows * per_row
        expect = math.ceil(
            (numel * fmt.bits + ng * 16 + (0 if fmt.symmetric else ng * fmt.bits)) / 8
        )
    assert tensor_bytes(fmt, rows, cols) == expect


def test_bytes_examples() -> None:
    # 384x384 int4-g128: 147456 weights x 4 bits + 384 rows x 3 groups x 16-bit scales.
    assert tensor_bytes(parse_format("int4-g128"), 384, 384) == (147456 * 4 + 1152 * 16) // 8
    # Asymmetric adds a b-bit zero point per group; the single ceiling is over everything.
    assert tensor_bytes(parse_format("int3-g64-asym"), 1, 65) == math.ceil((65 * 3 + 2 * 19) / 8)
    assert parse_format("int4-g128").bits_per_weight(4096) == pytest.approx(4.125)
