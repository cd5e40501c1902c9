"""AWQ's weight clipping: per group, shrink the range where that lowers the output error.

AWQ (Lin et al., 2023, arXiv 2306.00978) has two parts. The first, and the paper's headline,
scales each input channel by ``s`` and the weights by ``1/s`` so that salient channels round
more finely; that transform is only free when ``s`` is folded into the operation before the
layer (a norm or the previous linear layer), so the stored weights alone cannot express it in
DESIGN §3's formats. It is therefore not done here: this module keeps every code on the format's
own grid and the bytes unchanged.

The second part, ``auto_clip`` (``auto_clip_layer`` in mit-han-lab/llm-awq), is representable
and is what this module does: for each group, the weights are clamped to ``±r·absmax`` for
``r = 1, 0.95, …, 0.55`` (``n_grid = 20``, ``max_shrink = 0.5``; the reference's defaults), each
clamped group is quantized with the format's own rule, and the ``r`` whose output error on the
calibration statistics is smallest is kept. ``r = 1`` is exactly round-to-nearest and wins ties,
so the chosen codes are never worse than RTN's on that error.

The output error of one group, as in the reference, ignores the other groups: with the input
Gram matrix ``H = X·Xᵀ`` it is ``Δw_g · H_gg · Δw_gᵀ`` (``H_gg``: the diagonal block of the
group's columns); with only ``act_scale`` (mean ``|x|`` per input channel) it is
``Σ_j (act_scale_j · Δw_j)²``. (The reference measures it on 512 sampled tokens; ``H`` holds
every calibration token at no extra cost.) The clamp is symmetric (``±r·absmax``) for ``-asym``
formats too, as in the reference.
"""

from __future__ import annotations

import torch

from bitplan.sensitivity.formats import QuantCodes, QuantFormat, dequantize, quantize_codes
from bitplan.sensitivity.rounding._grid import Groups

__all__ = ["CLIP_RATIOS", "GroupErrors", "awq_codes", "clip_bounds"]

# The reference's grid: n_grid = 20 steps of 5%, shrinking by at most max_shrink = 0.5.
_N_GRID = 20
_MAX_SHRINK = 0.5
CLIP_RATIOS = tuple(1 - i / _N_GRID for i in range(int(_MAX_SHRINK * _N_GRID)))


class GroupErrors:
    """Per-group output error of a weight change, weighted by ``gram`` (its diagonal blocks
    ``H_gg``, cut out once) or by ``act_scale`` (exactly one is given)."""

    def __init__(
        self,
        groups: Groups,
        *,
        gram: torch.Tensor | None = None,
        act_scale: torch.Tensor | None = None,
    ) -> None:
        if (gram is None) == (act_scale is None):
            raise ValueError("GroupErrors takes exactly one of gram or act_scale")
        self.groups = groups
        n, size = groups.count, groups.size
        self.blocks: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        if gram is not None:
            pad = n * size - groups.cols  # zero rows and columns: padding weighs nothing
            h = torch.nn.functional.pad(gram, (0, pad, 0, pad))  # (n_groups·G, n_groups·G)
            blocks = h.reshape(n, size, n, size).diagonal(dim1=0, dim2=2)  # (G, G, n_groups)
            self.blocks = blocks.permute(2, 0, 1).contiguous()  # (n_groups, G, G)
        elif act_scale is not None:
            mask = groups.mask(act_scale.device)  # (n_groups, G)
            self.scale = groups.view(act_scale.unsqueeze(0)) * mask  # (1, n_groups, G)

    def __call__(self, dw: torch.Tensor) -> torch.Tensor:
        """``[rows, n_groups]`` errors of ``dw`` ``[rows, cols]``."""
        d = self.groups.view(dw)  # (rows, n_groups, G)
        if self.blocks is not None:
            dt = d.transpose(0, 1)  # (n_groups, rows, G)
            hd = torch.bmm(dt, self.blocks)  # (n_groups, rows, G)
            return (hd * dt).sum(dim=-1).transpose(0, 1)  # (rows, n_groups)
        assert self.scale is not None  # one of the two is set by __init__
        return (d * self.scale).square().sum(dim=-1)  # (rows, n_groups)


def _clipped(w: torch.Tensor, groups: Groups, bound: torch.Tensor) -> torch.Tensor:
    """``w`` clamped group-wise to ``±bound`` (``bound``: ``[rows, n_groups]``)."""
    b = bound.unsqueeze(-1)  # (rows, n_groups, 1)
    return groups.unview(torch.clamp(groups.view(w), -b, b))  # (rows, cols)


def clip_bounds(
    w: torch.Tensor,
    fmt: QuantFormat,
    *,
    gram: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The chosen clip bound ``r·absmax`` of every group, ``[rows, n_groups]``; of equal errors
    the largest ``r`` wins, so ``r = 1`` (round-to-nearest) unless a clip is strictly better."""
    groups = Groups.of(fmt, w.shape[1])
    errors = GroupErrors(groups, gram=gram, act_scale=act_scale)
    absmax = groups.view(w).abs().amax(dim=-1)  # (rows, n_groups)
    best_err = torch.full_like(absmax, torch.inf)
    best = absmax
    for r in CLIP_RATIOS:
        bound = absmax * r
        dq = dequantize(quantize_codes(_clipped(w, groups, bound), fmt), fmt, w.shape[1])
        err = errors(dq - w)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, bound, best)
    return best


def awq_codes(
    w: torch.Tensor,
    fmt: QuantFormat,
    *,
    gram: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
) -> QuantCodes:
    """Codes of ``w`` after AWQ's clip search: the format's rounding of the clipped groups."""
    bounds = clip_bounds(w, fmt, gram=gram, act_scale=act_scale)
    return quantize_codes(_clipped(w, Groups.of(fmt, w.shape[1]), bounds), fmt)
