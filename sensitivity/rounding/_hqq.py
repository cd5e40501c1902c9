"""HQQ: data-free scale and zero-point optimisation by half-quadratic splitting.

HQQ (Badri & Shaji, 2023, "Half-Quadratic Quantization of Large Machine Learning Models",
mobiusml.github.io/hqq_blog) fits a group's quantization parameters to its weights under a
sparsity-promoting ``lp`` loss (``p = 0.7``): ``min ‖W − Q⁻¹(Q(W))‖_p^p``. Splitting off the
error ``W_e`` gives two easy steps, alternated while the penalty ``β`` grows by ``κ``:

1. ``W_e ← shrink_p(W − Ŵ, β)``, the ``lp`` proximal operator
   ``sign(x)·relu(|x| − |x|^(p−1)/β)``: large errors (outliers) are kept out of the fit;
2. the parameters by least squares against ``W − W_e``: the zero-point
   ``z ← mean(q − (W − W_e)/s)`` (the reference's update, in DESIGN §3's parametrisation
   ``ŵ = (q − z)·s``), then the scale ``s ← ⟨q − z, W − W_e⟩ / ‖q − z‖²``.

The reference updates only the zero-point, which it may keep as a float. DESIGN §3 stores an
integer zero-point, and an integer zero-point only slides the window over the fixed grid
``{k·s}``: once rounded, a zero-point-only fit gave round-to-nearest's codes back on every group
we tried. The scale step (the same least-squares half of the splitting, for the other
parameter) is what lets HQQ pay in these formats; symmetric formats have no zero-point, so for
them it is the only step.

Hyper-parameters are the reference's (``optimize_weights_proximal`` in mobiusml/hqq:
``p = 0.7, β = 10, κ = 1.01``, 20 iterations). Its early stop on the mean absolute error is kept
per group: each group keeps the parameters with the smallest mean ``|W − Ŵ|`` seen.

The format stores an fp16 scale and an integer zero-point, so the result is rounded onto that
grid (as optimum-quanto does for its int zero-points) and the codes re-derived from it. Rounding
can undo the gain, so each group keeps whichever of these codes and round-to-nearest's has the
smaller squared weight error: ``hqq`` is never worse than ``rtn`` on ``‖ΔW‖²``.
"""

from __future__ import annotations

import torch

from bitplan.sensitivity.formats import QuantCodes, QuantFormat, _fp16_scale, quantize_codes
from bitplan.sensitivity.rounding._grid import (
    Groups,
    code_range,
    concat_codes,
    decode,
    encode,
    to_codes,
)

__all__ = ["BETA", "ITERS", "KAPPA", "LP_NORM", "hqq_codes", "shrink_lp"]

# The reference's defaults (hqq/core/optimize.py).
LP_NORM = 0.7
BETA = 10.0
KAPPA = 1.01
ITERS = 20
# Elements per chunk of rows: 256 KiB of float32, which stays in a core's cache (measured on a
# 4096×4096 matrix: ~7× faster than one pass over the whole matrix).
_CHUNK_ELEMENTS = 1 << 16


def shrink_lp(x: torch.Tensor, beta: float, p: float = LP_NORM) -> torch.Tensor:
    """The ``lp`` proximal (generalised soft-threshold) operator; 0 stays 0."""
    mag = x.abs()
    return torch.sign(x) * torch.relu(mag - mag.pow(p - 1) / beta)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum(dim=-1) / count  # (rows, n_groups)


def _scale_step(
    q: torch.Tensor,
    z: torch.Tensor | None,
    target: torch.Tensor,
    mask: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Least-squares scale ``⟨q − z, T⟩ / ‖q − z‖²`` of each group against the target ``T``;
    a group whose codes are all at the zero-point, or whose fit is not positive, keeps its
    scale."""
    c = q if z is None else q - z
    num = (c * target * mask).sum(dim=-1)  # (rows, n_groups)
    den = (c * c * mask).sum(dim=-1)
    fit = num / den.clamp_min(torch.finfo(den.dtype).tiny)
    return torch.where((den > 0) & (fit > 0), fit, scale)


def _optimise(
    g: torch.Tensor,
    mask: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    fmt: QuantFormat,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The HQQ iteration on grouped weights ``g`` ``[rows, n_groups, G]`` from the given
    parameters ``[rows, n_groups]``; returns the best (continuous) scale and zero-point seen."""
    lo, hi = code_range(fmt)
    count = mask.sum(dim=-1)  # (n_groups,)
    best_err = torch.full_like(scale, torch.inf)
    best_scale, best_zero = scale, zero
    beta = BETA
    for _ in range(ITERS):
        s = scale.unsqueeze(-1)  # (rows, n_groups, 1)
        z = None if zero is None else zero.unsqueeze(-1)
        q = torch.clamp(torch.round(g / s + (0 if z is None else z)), lo, hi)
        err = g - decode(q, s, z)
        mean_abs = _masked_mean(err.abs(), mask, count)
        better = mean_abs < best_err
        best_err = torch.where(better, mean_abs, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None and best_zero is not None:
            best_zero = torch.where(better, zero, best_zero)
        target = g - shrink_lp(err, beta)  # W − W_e
        if zero is not None:  # the reference's zero-point step
            zero = _masked_mean(q - target / s, mask, count)
        scale = _scale_step(q, None if zero is None else zero.unsqueeze(-1), target, mask, scale)
        beta *= KAPPA
    return best_scale, best_zero


def _square_error(
    g: torch.Tensor,
    mask: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
) -> torch.Tensor:
    """``‖w − ŵ‖²`` of every group, ``[rows, n_groups]``, for codes ``q`` like ``g``."""
    z = None if zero is None else zero.unsqueeze(-1)
    return ((g - decode(q, scale.unsqueeze(-1), z)).square() * mask).sum(dim=-1)


def hqq_codes(w: torch.Tensor, fmt: QuantFormat) -> QuantCodes:
    """HQQ codes of a float32 ``[rows, cols]`` matrix in an int format (data-free).

    Rows are independent, so they are done a few at a time: the iteration makes some thirty
    passes over its tensors per step, and a chunk that stays in the CPU's cache runs several
    times faster than the whole matrix at once.
    """
    step = max(1, _CHUNK_ELEMENTS // max(w.shape[1], 1))
    return concat_codes([_hqq_rows(w[i : i + step], fmt) for i in range(0, w.shape[0], step)])


def _hqq_rows(w: torch.Tensor, fmt: QuantFormat) -> QuantCodes:
    groups = Groups.of(fmt, w.shape[1])
    g = groups.view(w)  # (rows, n_groups, G)
    mask = groups.mask(w.device)  # (n_groups, G)
    rtn = quantize_codes(w, fmt)
    q0 = groups.view(rtn.q.to(torch.float32))  # (rows, n_groups, G)
    s0 = rtn.scale.to(torch.float32)  # (rows, n_groups)
    z0 = None if rtn.zero is None else rtn.zero.to(torch.float32)
    scale, zero = _optimise(g, mask, s0, z0, fmt)
    # Onto the stored grid: an fp16 scale and an integer zero-point in range.
    s1 = _fp16_scale(scale)
    z1 = None if zero is None else torch.clamp(torch.round(zero), *code_range(fmt))
    q1 = encode(g, s1.unsqueeze(-1), None if z1 is None else z1.unsqueeze(-1), fmt)
    # Strictly better groups only, so ties keep round-to-nearest's codes.
    take = _square_error(g, mask, q1, s1, z1) < _square_error(g, mask, q0, s0, z0)
    q = groups.unview(torch.where(take.unsqueeze(-1), q1, q0))  # (rows, cols)
    z = None if z0 is None or z1 is None else torch.where(take, z1, z0)
    return to_codes(q, torch.where(take, s1, s0), z)
