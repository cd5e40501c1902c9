"""The point type of the algorithms: one plan as the frontier, the search and the pipeline hold it.

bitplan has exactly two point types, for two different things:

* :class:`Point` (here) is a plan *being considered*: a choice of one parsed format per group,
  its planned bytes, the additive model's predicted error and what has been measured of it. The
  exact frontier makes them (:meth:`~bitplan.search.frontier.Frontier.point`), the measured
  search returns them (:func:`~bitplan.search.measured.measured_search`, hundreds a run, most
  never written anywhere), and the pipeline measures the few it keeps on both splits.
* :class:`~bitplan.search.plans.FrontierPoint` is a plan *published*: a point of a
  ``bitplan.frontier/v1`` file and of the REST API, named by its plan id, pointing at its plan
  file, with the total bytes and bpw of that file's byte rules (which need the model's layers and
  unplanned bytes, which a Point does not carry). It exists only once its plan file is written.

A Point becomes a FrontierPoint in one place, :func:`bitplan.search.outputs.publish`: it builds
the point's plan (:func:`~bitplan.search.plans.make_plan`) and writes it with the frontier file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from bitplan.sensitivity.format_spec import QuantFormat

__all__ = ["Choice", "Point", "choice_names"]

# One format per group: a tie group's name or a layer's FQN -> its format.
Choice = Mapping[str, QuantFormat]


def choice_names(choice: Choice) -> dict[str, str]:
    """``{group: format name}``: a choice as plan ids and Optuna's parameters spell it."""
    return {group: fmt.name for group, fmt in choice.items()}


@dataclass(frozen=True)
class Point:
    """One plan under consideration: what it chooses, its size and its errors.

    ``planned_bytes`` counts the planned tensors (a tie group once); the unplanned bytes are the
    same for every plan of a model and are added when the plan is built. ``predicted_error`` is
    the additive model's estimate (None where nobody predicted it, as in the measured search,
    which knows no sensitivity table). ``calibration`` and ``holdout`` hold the metrics measured
    on each split; ``calibration["error"]`` is the measured search's objective.

    ``source`` says how the point was found: ``exact`` (the proxy frontier), ``seed`` or
    ``sampler`` (a trial of the measured search), ``search`` (a measured Pareto point, once
    validated), ``uniform:<format>`` (a reference plan). ``number`` is its position where it was
    found: its index in the exact frontier, or its Optuna trial number.
    """

    choice: Choice
    planned_bytes: int
    predicted_error: float | None = None
    calibration: Mapping[str, float] = field(default_factory=dict)
    holdout: Mapping[str, float] = field(default_factory=dict)
    source: str = "exact"
    number: int | None = None

    @property
    def error(self) -> float:
        """The measured error on the calibration split; NaN while it is not measured."""
        return float(self.calibration.get("error", math.nan))
