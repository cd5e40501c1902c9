"""``e2e``: quantize one layer at a time and measure the model-level error (DESIGN §6).

Exact for each layer on its own (no proxy), and the costliest method: one full evaluation per
(tensor, format). The weight is fake-quantized in place with
:func:`bitplan.sensitivity.layers.quantized` and restored afterwards, so at most one extra copy of
one weight exists at any time. A tied tensor is one measurement; its score is split over the modules
that share it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from torch import nn

from bitplan.sensitivity.formats import QuantFormat
from bitplan.sensitivity.layers import QuantLayer, quantized
from bitplan.sensitivity.methods._common import (
    Scores,
    candidates,
    quantizer_of,
    spread_over_ties,
    tie_groups,
)
from bitplan.sensitivity.progress import CancelFn, ProgressFn, check_cancel, report

if TYPE_CHECKING:
    from bitplan.sensitivity.rounder import Rounder

__all__ = ["e2e_errors"]

logger = logging.getLogger(__name__)


def e2e_errors(
    module: nn.Module,
    layers: Sequence[QuantLayer],
    formats: Sequence[QuantFormat],
    *,
    evaluate: Callable[[], float],
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    rounder: Rounder | None = None,
) -> Scores:
    """Model-level error with each layer alone quantized, for every candidate format.

    ``evaluate()`` runs the model on the calibration data and returns its error against the
    full-precision reference (lower is better, 0 at full precision).
    """
    scores: Scores = {}
    for group in tie_groups(layers):
        errors = {}
        for fmt in candidates(group[0], formats):
            check_cancel(should_cancel)
            with quantized(module, group[0], fmt, codes=quantizer_of(rounder, group[0])):
                # A metric can come out a hair better than full precision by chance (fewer
                # flipped labels); the table holds losses, which are never negative.
                errors[fmt.name] = max(0.0, float(evaluate()))
        spread_over_ties(group, errors, scores)
        report(progress, "analyze", len(scores), len(layers))
        logger.debug("e2e errors of %s: %s", group[0].name, errors)
    return scores
