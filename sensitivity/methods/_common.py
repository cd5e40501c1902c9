"""Pieces every sensitivity method shares: candidate formats, tie groups, and weight deltas.

All methods score a weight matrix ``W`` (its ``[rows, cols]`` view, DESIGN §3) against its
fake-quantized ``Q(W)`` through ``ΔW = Q(W) − W``. :func:`iter_deltas` walks ``ΔW`` a chunk of
rows at a time, so no method ever holds a full float32 copy of a large weight: every format in
DESIGN §3 quantizes rows independently, so a chunk of rows quantizes exactly like those rows of
the whole matrix. ``Q(W)`` is rounded to the weight's own dtype first, because that is what the
quantized model computes with.

Scores are returned as ``{layer name: {format name: error}}``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from bitplan.sensitivity.formats import (
    CodesFn,
    QuantFormat,
    candidate_formats,
    chunk_rows,
    fake_quantize,
    parse_format,
)
from bitplan.sensitivity.layers import QuantLayer, get_weight, weight_matrix

if TYPE_CHECKING:
    from bitplan.sensitivity.rounder import Rounder

__all__ = [
    "ELEMENTWISE_CHUNK_ELEMENTS",
    "MATMUL_CHUNK_ELEMENTS",
    "Scores",
    "candidates",
    "iter_deltas",
    "layer_matrix",
    "quantizer_of",
    "spread_over_ties",
    "tie_groups",
]

Scores = dict[str, dict[str, float]]

# Rows are scored in chunks of at most so many elements, so the float32 work space stays bounded
# whatever the layer's size. Which size is fastest depends on the scoring (benchmarks/chunk_size.py,
# section "Scoring chunk size" of benchmarks/RESULTS.md):
# - a scoring that multiplies each chunk by a Gram matrix (``layer``) wants tall chunks, or the
#   [cols, cols] matrix is read from memory once per few rows: 4 Mi elements (three float32
#   buffers near 48 MiB);
# - an element-wise scoring (``weight``, fisher's fold) wants chunks that stay in the CPU's
#   caches: 128 Ki elements (512 KiB of float32). That keeps its temporaries below the 1 MiB mmap
#   threshold the CLI and the workers fix for large models (app/allocator.py), so they are reused
#   heap memory, not fresh mappings whose pages the kernel zeroes: fisher's fold ran 2.3x faster
#   than with 4 Mi-element chunks in that mode, and no slower with glibc's defaults.
MATMUL_CHUNK_ELEMENTS = 1 << 22
ELEMENTWISE_CHUNK_ELEMENTS = 1 << 17


def candidates(layer: QuantLayer, formats: Sequence[QuantFormat]) -> list[QuantFormat]:
    """The formats a layer gets rows for: only its pinned format when pinned, else each of
    ``formats`` as the layer can store it (a llama.cpp block format whose block does not divide
    the layer's rows becomes llama.cpp's fallback; see ``candidate_formats``)."""
    if layer.pinned is not None:
        return [parse_format(layer.pinned)]
    return candidate_formats(formats, layer.shape[1])


def quantizer_of(rounder: Rounder | None, layer: QuantLayer) -> CodesFn:
    """How ``layer``'s codes are made: by ``rounder``, or without calibration statistics (rtn
    and the data-free roundings) when there is none."""
    if rounder is None:
        from bitplan.sensitivity.rounder import Rounder  # noqa: PLC0415 - it imports methods

        rounder = Rounder()
    return rounder.quantizer(layer.param)


def tie_groups(layers: Sequence[QuantLayer]) -> list[list[QuantLayer]]:
    """Layers grouped by the tensor they store (tie group), in order of first appearance."""
    groups: dict[str, list[QuantLayer]] = {}
    for lay in layers:
        groups.setdefault(lay.tensor_key, []).append(lay)
    return list(groups.values())


def spread_over_ties(group: Sequence[QuantLayer], errors: dict[str, float], scores: Scores) -> None:
    """Record a per-tensor score for every member of its tie group.

    Convention (shared by the tensor-level methods ``weight``, ``fisher`` and ``e2e``): a tie
    group's error is the sum of its members' rows, so a tensor's score is split evenly over the
    modules that share it. An untied layer is a group of one and keeps its score whole.
    """
    share = 1.0 / len(group)
    for lay in group:
        scores[lay.name] = {name: err * share for name, err in errors.items()}


def layer_matrix(module: nn.Module, layer: QuantLayer) -> torch.Tensor:
    """The ``[rows, cols]`` view of ``layer``'s weight (no copy, no autograd history)."""
    return weight_matrix(get_weight(module, layer).detach(), layer.kind)


def iter_deltas(
    matrix: torch.Tensor,
    fmt: QuantFormat,
    *,
    block: int | None = None,
    codes: CodesFn | None = None,
    chunk_elements: int = MATMUL_CHUNK_ELEMENTS,
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, stop, W, ΔW)`` float32 chunks of rows ``start:stop`` of ``matrix``.

    ``block`` keeps every chunk inside one block of that many rows (grouped convolutions score
    each group of output channels against its own input statistics). ``codes`` makes the
    codes of a format with a rounding other than rtn (see
    :meth:`bitplan.sensitivity.rounder.Rounder.quantizer`). ``chunk_elements`` bounds a chunk's
    size (whole rows, at least one) for rtn formats: :data:`MATMUL_CHUNK_ELEMENTS` or
    :data:`ELEMENTWISE_CHUNK_ELEMENTS`, by what the caller does with each chunk; a format with
    another rounding always walks :data:`MATMUL_CHUNK_ELEMENTS` (gptq's work per call does not
    shrink with the chunk).
    """
    rows, cols = matrix.shape
    block = rows if block is None else block
    # A rounding other than rtn costs the same per call whatever the chunk: tall chunks for it.
    step = min(block, chunk_rows(fmt, cols, chunk_elements, rounded_elements=MATMUL_CHUNK_ELEMENTS))
    for first in range(0, rows, block):
        for start in range(first, min(first + block, rows), step):
            stop = min(start + step, first + block, rows)
            chunk = matrix[start:stop]
            q = fake_quantize(
                chunk, fmt, codes=codes, row0=start
            )  # in the weight's dtype, as the model would see it
            w = chunk.to(torch.float32)
            yield start, stop, w, q.to(torch.float32) - w
