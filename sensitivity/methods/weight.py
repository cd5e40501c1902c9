"""``weight``: data-free relative weight error ``‖Q(W) − W‖² / ‖W‖²`` per format (DESIGN §6).

The cheapest method: it needs no calibration data and no forward pass, only the weights. It
ignores how much each weight matters to the outputs, so it is a baseline and a fallback when no
data is at hand. An all-zero weight scores 0 (nothing to lose).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from bitplan.sensitivity.formats import QuantFormat
from bitplan.sensitivity.layers import QuantLayer
from bitplan.sensitivity.methods._common import (
    ELEMENTWISE_CHUNK_ELEMENTS,
    Scores,
    candidates,
    iter_deltas,
    layer_matrix,
    quantizer_of,
    spread_over_ties,
    tie_groups,
)
from bitplan.sensitivity.progress import CancelFn, ProgressFn, check_cancel, report

if TYPE_CHECKING:
    from bitplan.sensitivity.rounder import Rounder

__all__ = ["weight_errors"]

logger = logging.getLogger(__name__)


def weight_errors(
    module: nn.Module,
    layers: Sequence[QuantLayer],
    formats: Sequence[QuantFormat],
    *,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    rounder: Rounder | None = None,
) -> Scores:
    """Relative weight error of every layer in every candidate format (formats with a rounding
    other than rtn are rounded by ``rounder``).

    Tied layers share one tensor, so its score is split over them (see ``spread_over_ties``).
    """
    scores: Scores = {}
    for group in tie_groups(layers):
        check_cancel(should_cancel)
        matrix = layer_matrix(module, group[0])
        errors = {}
        for fmt in candidates(group[0], formats):
            num = den = 0.0
            codes = quantizer_of(rounder, group[0])
            for _, _, w, dw in iter_deltas(
                matrix, fmt, codes=codes, chunk_elements=ELEMENTWISE_CHUNK_ELEMENTS
            ):
                num += float(dw.square().sum())
                den += float(w.square().sum())
            errors[fmt.name] = num / den if den > 0 else 0.0
        spread_over_ties(group, errors, scores)
        report(progress, "analyze", len(scores), len(layers))
        logger.debug("weight errors of %s: %s", group[0].name, errors)
    return scores
