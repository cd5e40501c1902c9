"""GPTQ: error-compensating rounding from the calibration inputs' Gram matrix.

GPTQ (Frantar et al., 2022, arXiv 2210.17323) rounds the columns of ``W`` one at a time, in
order, and after each column spreads that column's rounding error over the columns not yet
rounded so that the layer's output error ``tr(ΔW·H·ΔWᵀ)`` (``H = X·Xᵀ``) stays small. The
spreading is the optimal-brain-surgeon update: with ``H⁻¹`` restricted to the columns still
free, rounding column ``i`` to ``q`` moves the free columns by ``−(w_i − q)/[H⁻¹]_ii ·
[H⁻¹]_{i,free}``. The paper's two tricks make it fast and stable, and are used here:

- the rows of ``H⁻¹`` the updates need are the rows of the upper Cholesky factor ``U`` of
  ``H⁻¹`` (``[H⁻¹]_{i,i:}/[H⁻¹]_ii = U_{i,i:}/U_ii``), so no inverse is updated column by column;
- lazy batches: updates inside a block of 128 columns are applied at once, and the rest of the
  matrix is updated once per block with a matrix product.

As in the reference implementation (``gptq.py`` of IST-DASLab/gptq, without ``act_order``), a
group's scale and zero-point are computed by the format's own rule (DESIGN §3) from the group's
error-updated weights at the moment its first column is reached, so the codes, scales and
zero-points are exactly what the format stores. ``H`` is dampened by 1% of its mean diagonal.

Dead columns (``H_ii = 0``: an input that was always zero on the calibration data) get
``H_ii = 1``, like the reference. The reference also zeroes their weights; here they keep their
value, rounded to nearest: the calibration data cannot tell which value is right, and the
weight's own value is what the layer does on inputs the calibration data never showed. Their
rounding error does not spread (their row and column of ``H`` are zero), so the calibration
error is the same either way.

Rows are independent (each row's updates involve only that row), so every step is vectorised
over rows. The Cholesky factorisation runs in float64, the sweep in float32.
"""

from __future__ import annotations

import torch

from bitplan.sensitivity.formats import QuantCodes, QuantFormat, quantize_codes
from bitplan.sensitivity.rounding._errors import RoundingError
from bitplan.sensitivity.rounding._grid import Groups, decode, encode, to_codes

__all__ = ["BLOCK", "DAMP", "gptq_codes", "inverse_hessian_factor"]

# Columns per lazy batch: the reference's default, a good size for the matrix products.
BLOCK = 128
# Dampening, as a fraction of the mean of diag(H): the reference's default ``percdamp``.
DAMP = 0.01


def inverse_hessian_factor(gram: torch.Tensor, *, damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factor ``U`` (``UᵀU = H⁻¹``) of the dampened ``H``, as float32.

    Dead columns get ``H_ii = 1`` first; then ``damp · mean(diag H)`` is added to the diagonal.
    """
    h = gram.to(torch.float64).clone()  # (cols, cols)
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    diag += damp * diag.mean()
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise _not_positive_definite()
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if int(info) != 0:
        raise _not_positive_definite()
    factor: torch.Tensor = upper.to(torch.float32)
    return factor


def _not_positive_definite() -> RoundingError:
    return RoundingError(
        "the Gram matrix is not positive semi-definite even after dampening; pass X·Xᵀ of the "
        "layer's calibration inputs"
    )


class _GroupParams:
    """Scales and zero-points ``[rows, n_groups]``, set group by group as the sweep reaches
    each group, and the codes and values of one column on its group's grid."""

    def __init__(self, fmt: QuantFormat, rows: int, groups: Groups, device: torch.device) -> None:
        self.fmt = fmt
        self.scale = torch.empty(rows, groups.count, device=device)
        self.zero = None if fmt.symmetric else torch.empty_like(self.scale)

    def set(self, g: int, current: torch.Tensor) -> None:
        """Group ``g``'s parameters from its current weights ``[rows, ≤G]``, by the format's
        own rule (DESIGN §3)."""
        params = quantize_codes(current, self.fmt)  # one group
        self.scale[:, g] = params.scale[:, 0].to(torch.float32)
        if self.zero is not None and params.zero is not None:
            self.zero[:, g] = params.zero[:, 0].to(torch.float32)

    def round(self, g: int, column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes of one column in group ``g`` and the values they dequantize to."""
        s = self.scale[:, g]
        z = None if self.zero is None else self.zero[:, g]
        q = encode(column, s, z, self.fmt)
        return q, decode(q, s, z)


def gptq_codes(
    w: torch.Tensor, fmt: QuantFormat, gram: torch.Tensor, *, block: int = BLOCK
) -> QuantCodes:
    """GPTQ codes of a float32 ``[rows, cols]`` matrix in an int format, given ``H = X·Xᵀ``.

    The sweep works on ``Wᵀ`` so that a column of ``W`` and a block of columns are contiguous
    in memory (the rank-1 updates run several times faster than on strided columns).
    """
    rows, cols = w.shape
    groups = Groups.of(fmt, cols)
    u = inverse_hessian_factor(gram.to(w.device))  # (cols, cols)
    # (cols, rows): error-updated in place, so always a copy (for a transposed view, such as a
    # GPT-2 Conv1D weight's matrix, .contiguous() would hand back the model's own storage)
    work = w.to(torch.float32).t().clone(memory_format=torch.contiguous_format)
    codes = torch.empty_like(work)  # (cols, rows)
    params = _GroupParams(fmt, rows, groups, w.device)
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        cur = work[start:stop]  # a view: in-block updates land in ``work``
        errs = torch.zeros_like(cur)  # the block's scaled errors (w − q)/U_ii, a row per column
        u_blk = u[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            g, offset = divmod(col, groups.size)
            if offset == 0:
                end = min(col + groups.size, cols)
                if end <= stop:  # the group lies in the block: up to date in ``work``
                    params.set(g, work[col:end].t())
                else:  # columns past the block still lack the block's pending update
                    pending = work[stop:end] - u[start:col, stop:end].t() @ errs[:i]
                    params.set(g, torch.cat([work[col:stop], pending]).t())  # (rows, end − col)
            q, value = params.round(g, cur[i])
            codes[col] = q
            err = (cur[i] - value) / u_blk[i, i]
            cur[i:].addr_(u_blk[i, i:], err, alpha=-1.0)
            errs[i] = err
        if stop < cols:  # the lazy batch update of everything after the block
            work[stop:].addmm_(u[start:stop, stop:].t(), errs, alpha=-1.0)
    return to_codes(codes.t(), params.scale, params.zero)
