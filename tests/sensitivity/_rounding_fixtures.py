"""Weights, calibration inputs and error measures shared by the rounding tests."""

from __future__ import annotations

import torch

from bitplan.sensitivity.formats import QuantCodes, QuantFormat, dequantize


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian(seed: int, rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=gen(seed))


def heavy_tailed(seed: int, rows: int, cols: int, *, dof: int = 3) -> torch.Tensor:
    """Student-t weights (``dof`` degrees of freedom): a few large outliers per group, like the
    weights of trained networks."""
    g = gen(seed)
    normal = torch.randn(rows, cols, generator=g)
    chi2 = torch.randn(dof, rows, cols, generator=g).square().sum(dim=0)
    return normal / (chi2 / dof).sqrt()


def correlated_inputs(seed: int, n: int, cols: int) -> torch.Tensor:
    """``[n, cols]`` calibration inputs with correlated channels of unequal size (a few
    salient channels), the case second-order rounding exists for."""
    g = gen(seed)
    mixing = torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols**0.5
    size = torch.exp(torch.randn(cols, generator=g))
    return (torch.randn(n, cols, generator=g) @ mixing) * size


def gram_of(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x  # (cols, cols)


def output_error(dw: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(ΔW·H·ΔWᵀ)`` in float64."""
    d = dw.to(torch.float64)
    return float(((d @ h.to(torch.float64)) * d).sum())


def weight_delta(w: torch.Tensor, codes: QuantCodes, fmt: QuantFormat) -> torch.Tensor:
    return dequantize(codes, fmt, w.shape[1]) - w
