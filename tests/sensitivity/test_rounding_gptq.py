"""GPTQ against the textbook column loop, brute force, and round-to-nearest.

The reference here is GPTQ's update written the long way (Frantar et al. 2022, eqs. 2–3): after
each column, the free columns move by ``−err · H⁻¹[i, F] / H⁻¹[i, i]`` and ``H⁻¹`` loses row and
column ``i`` by Gaussian elimination, in float64, one column at a time: no Cholesky factor and no
lazy batches, which is what the implementation adds.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from bitplan.sensitivity.formats import QuantFormat, dequantize, parse_format, quantize_codes
from bitplan.sensitivity.rounding import round_codes
from bitplan.sensitivity.rounding._gptq import gptq_codes
from tests.sensitivity._rounding_fixtures import (
    correlated_inputs,
    gaussian,
    gram_of,
    output_error,
    weight_delta,
)

DAMP = 0.01  # the dampening the reference implementation uses


def textbook_gptq(w: torch.Tensor, fmt: QuantFormat, h: torch.Tensor) -> torch.Tensor:
    """Dequantized GPTQ weights by the plain column loop (float64)."""
    rows, cols = w.shape
    size = cols if fmt.group_size is None else min(fmt.group_size, cols)
    h = h.to(torch.float64).clone()
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    diag += DAMP * diag.mean()
    hinv = torch.linalg.inv(h)
    work = w.to(torch.float64).clone()
    out = torch.empty_like(work)
    qmax = 2 ** (fmt.bits - 1) - 1
    lo, hi = (-qmax, qmax) if fmt.symmetric else (0, 2**fmt.bits - 1)
    scale = zero = torch.zeros(rows, dtype=torch.float64)
    for c in range(cols):
        if c % size == 0:  # the format's own scale rule on the group's current weights
            params = quantize_codes(work[:, c : c + size].to(torch.float32), fmt)
            scale = params.scale[:, 0].to(torch.float64)
            if params.zero is not None:
                zero = params.zero[:, 0].to(torch.float64)
        q = torch.clamp(torch.round(work[:, c] / scale) + zero, lo, hi)
        out[:, c] = (q - zero) * scale
        err = (work[:, c] - out[:, c]) / hinv[c, c]
        work[:, c:] -= err[:, None] * hinv[c, c:][None, :]
        hinv = hinv - hinv[:, c : c + 1] @ hinv[c : c + 1, :] / hinv[c, c]
    return out.to(torch.float32)


@pytest.mark.parametrize("name", ["int2", "int3", "int3-g3-asym", "int3-g4", "int2-g2-asym"])
@pytest.mark.parametrize("seed", range(4))
def test_matches_the_textbook_loop_on_tiny_matrices(name: str, seed: int) -> None:
    fmt = parse_format(name)
    w = gaussian(seed, 4, 6)
    h = gram_of(correlated_inputs(100 + seed, 40, 6))
    want = textbook_gptq(w, fmt, h)
    rtn = dequantize(quantize_codes(w, fmt), fmt, 6)
    for block in (128, 4, 1):  # groups inside a block, across blocks, one column per block
        got = dequantize(gptq_codes(w, fmt, h, block=block), fmt, 6)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    got = dequantize(round_codes(w, fmt, "gptq", gram=h), fmt, 6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if seed == 0:
        assert not torch.equal(got, rtn), "the case must exercise error compensation"


def test_matches_the_textbook_loop_across_block_boundaries() -> None:
    # Groups of 100 straddle the 128-column blocks, so group scales need pending updates.
    fmt = parse_format("int4-g100-asym")
    w = gaussian(7, 6, 300)
    h = gram_of(correlated_inputs(8, 600, 300))
    got = dequantize(round_codes(w, fmt, "gptq", gram=h), fmt, 300)
    torch.testing.assert_close(got, textbook_gptq(w, fmt, h), atol=1e-5, rtol=0)


def test_dead_columns_keep_their_nearest_value_and_do_not_spread() -> None:
    fmt = parse_format("int3")  # per-row: the scale is fixed before any update
    w = gaussian(9, 5, 8)
    x = correlated_inputs(10, 40, 8)
    x[:, 3] = 0.0  # input channel 3 never fires on the calibration data
    h = gram_of(x)
    codes = round_codes(w, fmt, "gptq", gram=h)
    torch.testing.assert_close(
        dequantize(codes, fmt, 8), textbook_gptq(w, fmt, h), atol=1e-5, rtol=0
    )
    assert torch.equal(codes.q[:, 3], quantize_codes(w, fmt).q[:, 3])
    assert torch.equal(codes.scale, quantize_codes(w, fmt).scale)


def test_a_diagonal_gram_gives_round_to_nearest() -> None:
    # Uncorrelated inputs: an error has nowhere to go, so GPTQ is RTN exactly.
    fmt = parse_format("int3-g8-asym")
    w = gaussian(11, 6, 20)
    h = torch.diag(torch.rand(20, generator=torch.Generator().manual_seed(12)) + 0.1)
    got, want = round_codes(w, fmt, "gptq", gram=h), quantize_codes(w, fmt)
    assert torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale)
    assert got.zero is not None and want.zero is not None and torch.equal(got.zero, want.zero)


# At 2 bits with a zero-point the grid has 4 levels and little room to absorb an error, so
# GPTQ's gain there is small (about 5% on these inputs); elsewhere it is about 25–30%.
@pytest.mark.parametrize(
    ("name", "bound"),
    [("int4-g16", 0.8), ("int3-g8-asym", 0.8), ("int2", 0.8), ("int2-g32-asym", 1)],
)
def test_lowers_the_output_error_on_correlated_inputs(name: str, bound: float) -> None:
    fmt = parse_format(name)
    rtn_total = gptq_total = 0.0
    for seed in range(6):
        w = gaussian(seed, 16, 64)
        h = gram_of(correlated_inputs(50 + seed, 256, 64))
        rtn_total += output_error(weight_delta(w, quantize_codes(w, fmt), fmt), h)
        gptq = round_codes(w, fmt, "gptq", gram=h)
        gptq_total += output_error(weight_delta(w, gptq, fmt), h)
    assert gptq_total < bound * rtn_total, (gptq_total, rtn_total)


# GPTQ is greedy: on a single row it can lose to RTN (about 1 seed in 8 here), so the second
# inequality holds on the total. (Per-row int2 has 3 levels and is a coin toss; left out.)
@pytest.mark.parametrize("name", ["int3", "int4", "int2-asym"])
def test_between_brute_force_and_round_to_nearest_on_one_row(name: str) -> None:
    fmt = parse_format(name)
    qmax = 2 ** (fmt.bits - 1) - 1
    lo, hi = (-qmax, qmax) if fmt.symmetric else (0, 2**fmt.bits - 1)
    every = torch.tensor(list(itertools.product(range(lo, hi + 1), repeat=4)), dtype=torch.float32)
    best_total = gptq_total = rtn_total = 0.0
    for seed in range(8):
        w = gaussian(seed, 1, 4)
        h = gram_of(correlated_inputs(200 + seed, 64, 4))
        rtn = quantize_codes(w, fmt)
        gptq = round_codes(w, fmt, "gptq", gram=h)
        # One scale per row, set before any update: the same grid as RTN's.
        assert torch.equal(gptq.scale, rtn.scale)
        zero = 0.0 if rtn.zero is None else float(rtn.zero[0, 0])
        values = (every - zero) * float(rtn.scale[0, 0])  # (n_assignments, 4)
        dws = (values - w).to(torch.float64)  # every assignment's ΔW, one per row
        best = float(((dws @ h.to(torch.float64)) * dws).sum(dim=1).min())
        got = output_error(weight_delta(w, gptq, fmt), h)
        assert best <= got * (1 + 1e-9), (seed, best, got)
        best_total += best
        gptq_total += got
        rtn_total += output_error(weight_delta(w, rtn, fmt), h)
    assert best_total <= gptq_total < rtn_total, (best_total, gptq_total, rtn_total)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leaves_a_transposed_weight_view_untouched(dtype: torch.dtype) -> None:
    """A GPT-2 Conv1D stores ``[in, out]``; its matrix is a transposed view, whose transpose is
    the model's own contiguous storage: rounding must not update the model's weights."""
    stored = gaussian(3, 12, 8).to(dtype)  # (cols, rows): how Conv1D keeps the weight
    before = stored.clone()
    w = stored.t()  # (rows, cols): the matrix view rounding sees
    x = correlated_inputs(4, 64, 12)
    gptq_codes(w, parse_format("int3-g4"), gram_of(x))
    assert torch.equal(stored, before)
