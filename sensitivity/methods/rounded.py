"""Scores of rounded options for methods that cannot see what the rounding is for.

``weight`` scores ``‖ΔW‖²`` and ``fisher`` the diagonal Fisher ``Σ F ⊙ ΔW²``: both weigh every
weight's error alone. GPTQ and AWQ choose integers whose errors *cancel* in the layer's output
(GPTQ moves each column's error onto the columns still to come, along the input correlations in
``H = X·Xᵀ``), so they raise the per-weight error while lowering the output error — and a
diagonal score ranks them worse than round-to-nearest. On ``builtin:digits-cnn`` diagonal fisher
scored gptq 1.5-2.5x *worse* than rtn in every layer while the model-level KL (``e2e``) was
10-50x *better*.

The fix uses the Kronecker-factored view of the Fisher (K-FAC, Martens & Grosse 2015:
``F ≈ A ⊗ G`` with ``A`` the input Gram matrix): a rounding changes how ``ΔW`` lies against
``A``, which the ``layer`` method measures exactly (``tr(ΔW·H·ΔWᵀ)``), while the method's own
score of the storage format keeps its calibration across layers. A rounded option's score is

    score(format + rounding) = score(format, rtn) · layer(format + rounding) / layer(format, rtn)

so the method decides how much a layer matters and ``layer`` how much the rounding helps.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from bitplan.sensitivity.formats import QuantFormat
from bitplan.sensitivity.methods._common import Scores

__all__ = ["needs_rescaling", "rescale_rounded", "scored_formats"]

logger = logging.getLogger(__name__)

# Methods whose score weighs each weight's error alone (see the module docstring).
DIAGONAL_METHODS = ("weight", "fisher")


def needs_rescaling(method: str, formats: Sequence[QuantFormat]) -> bool:
    """Whether ``method``'s scores of ``formats`` go through :func:`rescale_rounded`."""
    return method in DIAGONAL_METHODS and any(f.rounding != "rtn" for f in formats)


def scored_formats(formats: Sequence[QuantFormat]) -> tuple[list[QuantFormat], list[QuantFormat]]:
    """``(formats the method scores itself, formats the layer ratio scores)``: the round-to-
    nearest ones (every rounded option's storage format among them), and the rounded options
    with their storage formats."""
    rounded = [f for f in formats if f.rounding != "rtn"]
    bases = [f.with_rounding("rtn") for f in rounded]
    direct = list(dict.fromkeys([f for f in formats if f.rounding == "rtn"] + bases))
    return direct, list(dict.fromkeys(rounded + bases))


def rescale_rounded(
    scores: Scores, by_layer: Mapping[str, Mapping[str, float]], rounded: Sequence[QuantFormat]
) -> Scores:
    """``scores`` with every rounded option of ``rounded`` added as its storage format's score
    times the ``layer`` method's ratio ``by_layer[option] / by_layer[format]`` (module
    docstring). A layer ``layer`` could not score (it saw no input) keeps the format's score."""
    out: Scores = {}
    for name, errors in scores.items():
        row = dict(errors)
        ratios = by_layer.get(name, {})
        for fmt in rounded:
            base = fmt.with_rounding("rtn").name
            if fmt.rounding == "rtn" or base not in errors:
                continue
            den = ratios.get(base, 0.0)
            ratio = ratios.get(fmt.name, den) / den if den > 0 else 1.0
            row[fmt.name] = errors[base] * ratio
        out[name] = row
    return out
