"""The measured Pareto set: non-dominated plans over (planned bytes, measured error).

Its own module because both the measured search (its result) and the guided trials (the
frontier they extend, one point at a time) need it; :mod:`bitplan.search.measured` re-exports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bitplan.search.points import Point

__all__ = ["pareto_front"]


def pareto_front(points: Sequence[Point], *, cap_bytes: int | None) -> list[Point]:
    """Non-dominated points over (planned bytes, measured error) within the cap, by bytes.

    Points with a non-finite (or unmeasured) error never qualify; of several with the same
    (bytes, error), the earliest (lowest number, then first given) is kept. The front of a set
    plus one point is the front of (its front plus that point), so callers may keep it
    incrementally.
    """
    feasible = [
        p
        for p in points
        if math.isfinite(p.error) and (cap_bytes is None or p.planned_bytes <= cap_bytes)
    ]
    order = sorted(
        range(len(feasible)),
        key=lambda i: (feasible[i].planned_bytes, feasible[i].error, _number(feasible[i]), i),
    )
    front: list[Point] = []
    for i in order:
        if not front or feasible[i].error < front[-1].error:
            front.append(feasible[i])
    return front


def _number(point: Point) -> float:
    return math.inf if point.number is None else point.number
