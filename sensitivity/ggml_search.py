"""The scale searches of llama.cpp's k-quants, vectorised over sub-blocks, bit for bit.

llama.cpp's reference (non-imatrix) k-quant quantizers (``ggml/src/ggml-quants.c``:
``make_qkx2_quants`` for q2_K/q4_K/q5_K, ``make_q3_quants`` for q3_K, ``make_qx_quants`` for
q6_K) choose each sub-block's scale (and minimum) by a small search whose decisions compare
float32 sums. To store the same bytes as ``llama-quantize``, every sum here is accumulated in
float32 in the reference's order (element 0, 1, 2, …) and every product is rounded as the
reference rounds it (``w*x*l`` is ``(w*x)*l``); there is no fused multiply-add. This is our own
implementation of the published algorithm, vectorised *across* sub-blocks: tensors are
``(n, S)`` — element ``i`` of every one of ``S`` sub-blocks in row ``i`` — so the sequential
loops run over the 16 or 32 elements of a sub-block, never over sub-blocks.

``nearest_int`` is the reference's own rounding trick (add 1.5·2²³ and read the mantissa bits),
so it agrees with the reference even where the reference's argument is out of range.
"""

from __future__ import annotations

import torch

__all__ = [
    "f32",
    "first_max_abs",
    "make_q3_quants",
    "make_qkx2_quants",
    "make_qx_quants",
    "nearest_int",
    "seq_sum",
]

# 1.5·2²³: adding it to a float32 of magnitude < 2²² leaves the value rounded to an integer
# (ties to even) in the low mantissa bits (ggml's nearest_int).
_ROUND_MAGIC = 12582912.0
# Mantissa mask and the offset 2²² that nearest_int subtracts from the mantissa bits.
_MANTISSA = 0x007FFFFF
_MANTISSA_HALF = 0x00400000
# ggml's GROUP_MAX_EPS: a sub-block whose largest |x| is below this is all zeros.
GROUP_MAX_EPS = 1e-15


def f32(value: float) -> torch.Tensor:
    """A float32 scalar tensor, so arithmetic with it is float32 like the reference's ``…f``."""
    return torch.tensor(value, dtype=torch.float32)


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: round a float32 to int32, ties to even, by the reference's bits."""
    bits = (x + f32(_ROUND_MAGIC)).view(torch.int32)
    return (bits & _MANTISSA) - _MANTISSA_HALF


def seq_sum(t: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """``start + t[0] + t[1] + …`` in float32, left to right, over the first dim of ``(n, S)``.

    ``start`` defaults to 0 (the reference's ``float sum = 0``); pass ``t[0]`` as ``start`` and
    ``t[1:]`` for sums the reference seeds with their first term.
    """
    acc = torch.zeros_like(t[0]) if start is None else start.clone()
    for row in t:
        acc += row
    return acc


def first_max_abs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(amax, max)`` of ``(n, S)`` columns: the largest ``|x|`` and the signed value first
    reaching it, as the reference's ``if (ax > amax) { amax = ax; max = x; }`` (0 for all 0)."""
    ax = x.abs()
    amax, idx = ax.max(dim=0)  # ties: the first index (torch's documented rule)
    mx = x.gather(0, idx.unsqueeze(0)).squeeze(0)
    return amax, torch.where(amax > 0, mx, torch.zeros_like(mx))


def make_qkx2_quants(
    x: torch.Tensor,
    weights: torch.Tensor,
    *,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale, minimum and codes ``0..nmax`` of ``(n, S)`` sub-blocks (``make_qkx2_quants``).

    Returns ``(scale (S,), the_min (S,), L (n, S) int32)``: ``x ≈ scale·L − the_min``. Starts
    from the min/max grid, then tries ``nstep + 1`` grid widths, each refit by weighted least
    squares, and keeps the one with the least weighted error (squared, or absolute when
    ``use_mad``).
    """
    xmin = torch.clamp(x.amin(dim=0), max=0.0)  # the reference clamps a positive min to 0
    xmax = x.amax(dim=0)
    sum_w = seq_sum(weights[1:], start=weights[0])
    sum_x = seq_sum(weights[1:] * x[1:], start=weights[0] * x[0])
    flat = xmax == xmin
    fnmax = f32(float(nmax))

    def error(scale: torch.Tensor, mn: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        diff = scale * codes + mn - x  # (n, S)
        diff = diff.abs() if use_mad else diff * diff
        return seq_sum(weights * diff)

    iscale = fnmax / (xmax - xmin)
    scale = f32(1.0) / iscale
    codes = torch.clamp(nearest_int(iscale * (x - xmin)), 0, nmax)
    best = error(scale, xmin, codes.to(torch.float32))
    for step in range(nstep + 1):
        width = f32(rmin) + f32(rdelta) * f32(float(step)) + fnmax
        iscale = width / (xmax - xmin)
        aux = torch.clamp(nearest_int(iscale * (x - xmin)), 0, nmax)
        laux = aux.to(torch.float32)
        wl = weights * laux
        sum_l = seq_sum(wl)
        sum_l2 = seq_sum(wl * laux)
        sum_xl = seq_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, this_min, laux)
        better = (det > 0) & (cur < best) & ~flat
        codes = torch.where(better, aux, codes)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        xmin = torch.where(better, this_min, xmin)
    codes = torch.where(flat, torch.zeros_like(codes), codes)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -xmin, codes


def make_q3_quants(x: torch.Tensor, *, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed scale and codes ``0..2·nmax-1`` of ``(n, S)`` sub-blocks (``make_q3_quants``
    with ``do_rmse``): codes from ``-nmax/max``, then five passes of coordinate descent on the
    x²-weighted least-squares fit, one element at a time. All-zero sub-blocks get scale 0 and
    codes 0."""
    amax, mx = first_max_abs(x)
    zero = amax < f32(GROUP_MAX_EPS)
    iscale = f32(float(-nmax)) / mx
    codes = torch.clamp(nearest_int(iscale * x), -nmax, nmax - 1)  # (n, S) int32
    w = x * x
    wx = w * x
    lf = codes.to(torch.float32)
    sumlx = seq_sum(wx * lf)
    suml2 = seq_sum(w * lf * lf)
    for _ in range(5):  # the reference's itry < 5 (a pass without change ends it early)
        changed = torch.zeros_like(zero)
        for i in range(x.shape[0]):
            li = codes[i].to(torch.float32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new = torch.clamp(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1)
            nf = new.to(torch.float32)
            slx_new = slx + wx[i] * nf
            sl2_new = sl2 + w[i] * nf * nf
            take = (
                (slx > 0)
                & (new != codes[i])
                & (sl2_new > 0)
                & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            )
            codes[i] = torch.where(take, new, codes[i])
            sumlx = torch.where(take, slx_new, sumlx)
            suml2 = torch.where(take, sl2_new, suml2)
            changed |= take & ~zero
        if not bool(changed.any()):  # no sub-block changed: every further pass is the same
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    codes = torch.where(zero, torch.zeros_like(codes), codes + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), codes


def make_qx_quants(x: torch.Tensor, *, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed scale and codes ``0..2·nmax-1`` of ``(n, S)`` sub-blocks (``make_qx_quants`` with
    ``rmse_type = 1`` and no importance weights): x²-weighted least squares over 19 grid widths
    ``nmax + 0.1·is``, ``is`` in −9…9. All-zero sub-blocks get scale 0 and codes 0."""
    amax, mx = first_max_abs(x)
    zero = amax < f32(GROUP_MAX_EPS)
    w = x * x
    wx = w * x
    fnmax = f32(float(nmax))

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes = torch.clamp(nearest_int(iscale * x), -nmax, nmax - 1)  # (n, S) int32
        lf = codes.to(torch.float32)
        return codes, seq_sum(wx * lf), seq_sum(w * lf * lf)

    codes, sumlx, suml2 = fit(-fnmax / mx)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):  # the reference skips is = 0 (done above)
        cand, slx, sl2 = fit(-(fnmax + f32(0.1) * f32(float(step))) / mx)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        codes = torch.where(better, cand, codes)
        scale = torch.where(better, slx / sl2, scale)
        best = torch.where(better, scale * slx, best)
    codes = torch.where(zero, torch.zeros_like(codes), codes + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), codes
