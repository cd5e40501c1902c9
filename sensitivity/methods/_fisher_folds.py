"""Two ways for ``fisher`` to fold squared gradients into ``Σ F ⊙ ΔW²``, one per memory regime.

``fisher`` needs, for every planned tensor and candidate format ``f``, the sum over batches
``b`` and weights ``i`` of ``g_bi² · ΔW_fi²``. The order of the two sums is free:

- :class:`FisherSums` sums over batches first: a Fisher sum ``F_i = Σ_b g_bi²`` per weight,
  scored once after the last batch. One quantization per format, but the sums take the
  planned weights' size (a second checkpoint in RAM for a large model).
- :class:`StreamedErrors` sums over weights first: as each batch's gradient arrives it adds
  ``Σ_i g_bi² · ΔW_fi²`` to one float per format. Nothing the size of a weight outlives its
  gradient, at the price of quantizing every planned weight once per format *per batch*. It is
  exact too, and more precise than a bfloat16 sum: every product is formed in float32.

Both walk ``ΔW`` a chunk of rows at a time (:func:`~._common.iter_deltas`), so the float32 work
space stays bounded whatever a layer's size. :func:`gradient_fold` picks one by the size the
sums would take.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from bitplan.sensitivity.formats import CodesFn, QuantFormat
from bitplan.sensitivity.layers import QuantLayer, get_weight, weight_matrix
from bitplan.sensitivity.methods._common import (
    ELEMENTWISE_CHUNK_ELEMENTS,
    candidates,
    iter_deltas,
    quantizer_of,
)

if TYPE_CHECKING:
    from bitplan.sensitivity.rounder import Rounder

__all__ = ["DEFAULT_MAX_SUM_BYTES", "FisherSums", "GradientFold", "StreamedErrors", "gradient_fold"]

logger = logging.getLogger(__name__)

# Per-weight sums up to this size are kept (the faster fold). 256 MiB (a 128 M-parameter
# bfloat16 model) fits beside the ~0.5 GB of runtime inside the 1 GB that issue 9's bound
# (peak RSS <= 1.3 x checkpoint + 1 GB) allows on top of any checkpoint; larger sums would
# grow with the checkpoint and break it.
DEFAULT_MAX_SUM_BYTES = 256 * 2**20

Group = Sequence[QuantLayer]  # the layers of one tie group: one tensor, one Fisher


class GradientFold(Protocol):
    """Folds each planned tensor's gradient in as backward produces it, then scores it."""

    def fold(self, key: str, grad: torch.Tensor) -> None:
        """Add one batch's gradient of the tensor ``key`` (the weight's own shape)."""

    def totals(self, group: Group) -> dict[str, float] | None:
        """``Σ F ⊙ ΔW²`` of the group's tensor per candidate format (not yet halved or divided
        by the prediction count), or None when no gradient reached it."""


def _fisher_dtype(weight: torch.Tensor) -> torch.dtype:
    """float32 for float32 weights; bfloat16 for half ones: float32's exponent range (g² of a
    float16 gradient would underflow in float16) at the weight's own size."""
    return torch.float32 if weight.dtype == torch.float32 else torch.bfloat16


def _weighted_total(
    weigh: Callable[[int, int], torch.Tensor],
    matrix: torch.Tensor,
    fmt: QuantFormat,
    codes: CodesFn,
) -> float:
    """``Σ weigh ⊙ ΔW²`` over ``matrix`` in ``fmt``; ``weigh(start, stop)`` gives rows
    ``start:stop`` of the per-weight factor in float32."""
    total = 0.0
    chunks = iter_deltas(matrix, fmt, codes=codes, chunk_elements=ELEMENTWISE_CHUNK_ELEMENTS)
    for start, stop, _, dw in chunks:
        total += float((weigh(start, stop) * dw.square()).sum())
    return total


class _Scored:
    """What both folds know of every group: its weight's matrix view and candidate formats."""

    def __init__(
        self,
        module: nn.Module,
        groups: Sequence[Group],
        formats: Sequence[QuantFormat],
        rounder: Rounder | None,
    ) -> None:
        self.module = module
        self.layer = {g[0].tensor_key: g[0] for g in groups}  # the tensor's first layer
        self.formats = {key: candidates(lay, formats) for key, lay in self.layer.items()}
        self.codes = {key: quantizer_of(rounder, lay) for key, lay in self.layer.items()}
        self._start()

    def _start(self) -> None:
        """Set up the fold's own accumulators (after the shared attributes exist)."""

    def matrix(self, key: str) -> torch.Tensor:
        """The ``[rows, cols]`` view of the weight ``key`` (no copy, no autograd history)."""
        lay = self.layer[key]
        return weight_matrix(get_weight(self.module, lay).detach(), lay.kind)


class FisherSums(_Scored):
    """A Fisher sum per weight, scored after the last batch (see the module docstring)."""

    def _start(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        for key, lay in self.layer.items():
            w = get_weight(self.module, lay)
            self.sums[key] = torch.zeros_like(w, dtype=_fisher_dtype(w))

    def fold(self, key: str, grad: torch.Tensor) -> None:
        acc = self.sums[key]
        acc.add_(grad.to(acc.dtype).square())

    def totals(self, group: Group) -> dict[str, float] | None:
        key = group[0].tensor_key
        f = weight_matrix(self.sums.pop(key), group[0].kind)  # (rows, cols) like the weight view
        if not f.any():
            return None
        matrix = self.matrix(key)
        return {
            fmt.name: _weighted_total(
                lambda a, b: f[a:b].to(torch.float32), matrix, fmt, self.codes[key]
            )
            for fmt in self.formats[key]
        }


class StreamedErrors(_Scored):
    """Per-format totals, each batch's gradient folded in as it arrives (module docstring)."""

    def _start(self) -> None:
        self.errors: dict[str, dict[str, float]] = {}  # only tensors a gradient reached

    def fold(self, key: str, grad: torch.Tensor) -> None:
        if not grad.any():  # adds nothing; and a tensor no gradient reached gets no score
            return
        g = weight_matrix(grad, self.layer[key].kind)  # (rows, cols) like the weight view
        matrix = self.matrix(key)
        row = self.errors.setdefault(key, {})
        for fmt in self.formats[key]:
            part = _weighted_total(
                lambda a, b: g[a:b].to(torch.float32).square(), matrix, fmt, self.codes[key]
            )
            row[fmt.name] = row.get(fmt.name, 0.0) + part

    def totals(self, group: Group) -> dict[str, float] | None:
        return self.errors.pop(group[0].tensor_key, None)


def gradient_fold(
    module: nn.Module,
    groups: Sequence[Group],
    formats: Sequence[QuantFormat],
    rounder: Rounder | None,
    *,
    max_sum_bytes: int | None = None,
) -> GradientFold:
    """:class:`FisherSums` when the sums take at most ``max_sum_bytes`` (default
    :data:`DEFAULT_MAX_SUM_BYTES`, read at call time), else :class:`StreamedErrors`."""
    if max_sum_bytes is None:
        max_sum_bytes = DEFAULT_MAX_SUM_BYTES
    weights = [get_weight(module, g[0]) for g in groups]
    size = sum(w.numel() * _fisher_dtype(w).itemsize for w in weights)
    if size <= max_sum_bytes:
        return FisherSums(module, groups, formats, rounder)
    logger.info(
        "fisher: per-weight sums would take %.0f MiB (limit %.0f MiB); folding each batch's "
        "gradients into per-format errors instead",
        size / 2**20,
        max_sum_bytes / 2**20,
    )
    return StreamedErrors(module, groups, formats, rounder)
