"""Held-out frontier arithmetic both frontier benchmarks share.

``benchmarks/frontier.py`` (frontier vs uniform formats and baselines) and
``benchmarks/frontier_rounding.py`` (frontier with vs without rounding choices) compare plans at
equal size on the held-out split: "the frontier's error at size S" is the lowest held-out error
among its points no larger than S (:func:`best_within`), and ratios of errors decide the targets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bitplan.search.plans import FrontierPoint

__all__ = ["best_within", "fmt", "median", "pareto_holdout", "ratio"]


def ratio(a: float, b: float) -> float:
    """``a / b``, where a zero ``b`` gives 1 (both zero) or infinity."""
    return a / b if b > 0 else (1.0 if a == 0 else math.inf)


def fmt(x: float | None) -> str:
    """Three significant digits; a dash for a missing value."""
    return "–" if x is None or math.isnan(x) else f"{x:.3g}"


def median(values: Sequence[float]) -> float:
    """The median of the non-NaN ``values`` (NaN when there are none)."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def best_within(points: Sequence[FrontierPoint], total_bytes: int) -> FrontierPoint | None:
    """The point with the lowest held-out error among those no larger than ``total_bytes``."""
    fitting = [p for p in points if p.total_bytes <= total_bytes]
    return min(fitting, key=lambda p: p.holdout["error"], default=None)


def pareto_holdout(points: Sequence[FrontierPoint]) -> list[FrontierPoint]:
    """Points no other point beats on both size and held-out error, smallest first."""
    front: list[FrontierPoint] = []
    for p in sorted(points, key=lambda p: (p.total_bytes, p.holdout["error"])):
        if not front or p.holdout["error"] < front[-1].holdout["error"]:
            front.append(p)
    return front
