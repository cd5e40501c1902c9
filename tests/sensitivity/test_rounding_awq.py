"""AWQ's clip search against an exhaustive search over the same ratio grid, group by group."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from bitplan.sensitivity.formats import QuantFormat, dequantize, parse_format, quantize_codes
from bitplan.sensitivity.rounding import round_codes
from tests.sensitivity._rounding_fixtures import (
    correlated_inputs,
    gram_of,
    heavy_tailed,
)

# llm-awq's auto_clip grid: max_shrink 0.5 in n_grid = 20 steps, the full range first.
RATIOS = [1 - i / 20 for i in range(10)]
FORMATS = ["int3-g8", "int2-g6-asym", "int4", "int4-g32-asym"]
ROWS, COLS = 5, 20

# How a group's weight change is weighed: (Δw of one group, its first column) → error.
Weigh = Callable[[torch.Tensor, int], float]


def _by_gram(h: torch.Tensor) -> Weigh:
    h64 = h.to(torch.float64)

    def weigh(dw: torch.Tensor, c0: int) -> float:
        d = dw.to(torch.float64).flatten()
        block = h64[c0 : c0 + d.numel(), c0 : c0 + d.numel()]
        return float(d @ block @ d)

    return weigh


def _by_act_scale(s: torch.Tensor) -> Weigh:
    def weigh(dw: torch.Tensor, c0: int) -> float:
        d = dw.to(torch.float64).flatten()
        return float((d * s[c0 : c0 + d.numel()].to(torch.float64)).square().sum())

    return weigh


def _group_size(fmt: QuantFormat) -> int:
    return COLS if fmt.group_size is None else min(fmt.group_size, COLS)


def exhaustive_clip(w: torch.Tensor, fmt: QuantFormat, weigh: Weigh) -> torch.Tensor:
    """Dequantized weights with each group's best ratio, tried one by one (first best wins)."""
    out = torch.empty_like(w)
    size = _group_size(fmt)
    for r in range(w.shape[0]):
        for c0 in range(0, COLS, size):
            seg = w[r : r + 1, c0 : c0 + size]
            best_err, best = float("inf"), seg
            for ratio in RATIOS:
                bound = seg.abs().amax() * ratio
                dq = dequantize(quantize_codes(seg.clamp(-bound, bound), fmt), fmt, seg.shape[1])
                err = weigh(dq - seg, c0)
                if err < best_err:
                    best_err, best = err, dq
            out[r : r + 1, c0 : c0 + size] = best
    return out


def _group_errors(w: torch.Tensor, dq: torch.Tensor, fmt: QuantFormat, weigh: Weigh) -> list[float]:
    size = _group_size(fmt)
    return [
        weigh(dq[r, c0 : c0 + size] - w[r, c0 : c0 + size], c0)
        for r in range(w.shape[0])
        for c0 in range(0, COLS, size)
    ]


def _cases(seed: int) -> list[tuple[str, dict[str, torch.Tensor], Weigh]]:
    x = correlated_inputs(seed + 100, 64, COLS)
    h, s = gram_of(x), x.abs().mean(dim=0)
    return [("gram", {"gram": h}, _by_gram(h)), ("act_scale", {"act_scale": s}, _by_act_scale(s))]


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("seed", range(3))
def test_choice_equals_the_exhaustive_search(name: str, seed: int) -> None:
    fmt = parse_format(name)
    w = heavy_tailed(seed, ROWS, COLS)
    rtn = dequantize(quantize_codes(w, fmt), fmt, COLS)
    for label, stats, weigh in _cases(seed):
        got = dequantize(round_codes(w, fmt, "awq", **stats), fmt, COLS)
        assert torch.equal(got, exhaustive_clip(w, fmt, weigh)), label
        if seed == 0:
            assert not torch.equal(got, rtn), f"{label}: no group was clipped; a weak case"


@pytest.mark.parametrize("name", FORMATS)
def test_never_worse_than_round_to_nearest_on_the_weighted_error(name: str) -> None:
    fmt = parse_format(name)
    awq_total = rtn_total = 0.0
    for seed in range(4):
        w = heavy_tailed(seed + 10, ROWS, COLS)
        rtn = dequantize(quantize_codes(w, fmt), fmt, COLS)
        for label, stats, weigh in _cases(seed):
            got = dequantize(round_codes(w, fmt, "awq", **stats), fmt, COLS)
            awq_errs = _group_errors(w, got, fmt, weigh)
            rtn_errs = _group_errors(w, rtn, fmt, weigh)
            for a, r in zip(awq_errs, rtn_errs, strict=True):
                assert a <= r * (1 + 1e-5) + 1e-9, (label, a, r)
            awq_total += sum(awq_errs)
            rtn_total += sum(rtn_errs)
    assert awq_total < rtn_total
