"""Sensitivity methods on plain modules (DESIGN §6): each scores every planned layer in every
candidate format and returns ``{layer name: {format name: error}}``.

The functions here work on an ``nn.Module``, its :class:`~bitplan.sensitivity.layers.QuantLayer`
list and callables for data and evaluation, so they do not depend on how models and data are loaded;
:func:`bitplan.sensitivity.analyzer.analyze` adapts a loaded model and calibration data to them.
"""

from bitplan.sensitivity.methods._common import Scores, candidates, tie_groups
from bitplan.sensitivity.methods.e2e import e2e_errors
from bitplan.sensitivity.methods.fisher import FISHER_TARGETS, FisherTarget, fisher_errors
from bitplan.sensitivity.methods.layer import DEFAULT_STATS_BYTES, layer_errors
from bitplan.sensitivity.methods.weight import weight_errors

__all__ = [
    "DEFAULT_STATS_BYTES",
    "FISHER_TARGETS",
    "FisherTarget",
    "Scores",
    "candidates",
    "e2e_errors",
    "fisher_errors",
    "layer_errors",
    "tie_groups",
    "weight_errors",
]
