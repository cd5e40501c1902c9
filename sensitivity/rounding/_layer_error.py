"""The layer-output error of a set of codes: what GPTQ and AWQ's clip search minimise.

``tr(ΔW·H·ΔWᵀ) / tr(W·H·Wᵀ)`` with ``H = X·Xᵀ`` is ``‖ΔW·X‖² / ‖W·X‖²``, the ``layer``
sensitivity method's score (see :mod:`bitplan.sensitivity.methods._gram`), here for codes that
any rounding produced rather than for round-to-nearest.
"""

from __future__ import annotations

import torch

from bitplan.sensitivity.formats import QuantCodes, QuantFormat, dequantize

__all__ = ["layer_error", "output_energy"]


def output_energy(m: torch.Tensor, gram: torch.Tensor) -> float:
    """``tr(M·H·Mᵀ) = ‖M·X‖²`` of a ``[rows, cols]`` matrix ``M``, on ``M``'s device (a
    rounder's ``H`` is memory-mapped on the CPU whatever device the weight is on)."""
    m = m.to(torch.float64)
    return float(((m @ gram.to(device=m.device, dtype=torch.float64)) * m).sum())


def layer_error(w: torch.Tensor, codes: QuantCodes, fmt: QuantFormat, gram: torch.Tensor) -> float:
    """Relative output error ``tr(ΔW·H·ΔWᵀ) / tr(W·H·Wᵀ)`` of ``codes`` for the matrix ``w``;
    0 when ``W·X`` is 0 (nothing to lose)."""
    dw = dequantize(codes, fmt, w.shape[1]) - w.to(torch.float32)
    total = output_energy(w, gram)
    return output_energy(dw, gram) / total if total > 0 else 0.0
