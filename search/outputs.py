"""Publishing points: one plan file per frontier point, the frontier file and its CSV.

Layout of ``out_dir`` (the service serves these files as they are)::

    frontier.json        bitplan.frontier/v1: every point, the uniform baselines, plan paths
    frontier.csv         one row a point (uniform baselines included, marked by ``source``)
    plans/<plan_id>.json bitplan.plan/v1 for every frontier point and uniform baseline
    plans/best.json      a copy of the best plan under the budget
    sensitivity.csv      the sensitivity table (written by the analyze stage of a job)
    layers.json          the planned layers (written by the analyze stage of a job)

:func:`publish` is where an algorithm's :class:`~bitplan.search.points.Point` becomes a published
:class:`~bitplan.search.plans.FrontierPoint` (see :mod:`bitplan.search.points` for why there are
two): ``bitplan solve`` publishes exact-frontier points, a job its measured and validated ones.
Which point is best is the caller's call: ``solve`` takes the proxy's answer to the budget, a job
the lowest *calibration* error (:func:`best_measured`), the split the search optimised: choosing
by the held-out numbers would make them no longer held out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bitplan.search.budgets import Budget
from bitplan.search.plans import FrontierFile, Plan, make_plan, plan_id_of, write_frontier
from bitplan.search.points import Point
from bitplan.search.problem import Problem

__all__ = ["JobOutputs", "best_measured", "publish"]


@dataclass(frozen=True)
class JobOutputs:
    """What :func:`publish` wrote: the frontier file (its points and uniform baselines name
    exactly the plan files written) and the best plan's id (also ``plans/best.json``)."""

    frontier_path: Path
    frontier: FrontierFile
    best_plan_id: str | None

    @property
    def plan_ids(self) -> list[str]:
        """Every plan file written under ``plans/`` by its own id (``best.json`` is a copy)."""
        return [p.plan_id for p in self.frontier.points + self.frontier.uniform]


def best_measured(points: Sequence[Point]) -> Point | None:
    """The point with the lowest measured calibration error; None for no points."""
    return min(points, key=lambda p: p.error, default=None)


def publish(
    out_dir: Path,
    *,
    model_ref: str,
    model_sha256: str,
    problem: Problem,
    budget: Budget | None,
    points: Sequence[Point],
    uniform: Sequence[Point] = (),
    best: Point | None = None,
    scope: Mapping[str, str] | None = None,
) -> JobOutputs:
    """Write a plan per point and per uniform baseline, ``best.json`` and the frontier files.

    Each plan takes its layers and byte totals from ``problem``, its predicted error and its
    measured ``calibration``/``holdout`` metrics from the point, and the point's ``source``.
    ``best`` must be one of ``points``. ``scope`` (what the figures measure,
    :func:`~bitplan.search.plans.metrics_scope`) goes into every plan's metrics and the
    frontier file.
    """
    stated = {} if scope is None else {"scope": dict(scope)}

    def plan_of(point: Point) -> Plan:
        return make_plan(
            model_ref=model_ref,
            model_sha256=model_sha256,
            layers=problem.layers,
            choice=point.choice,
            budget=budget,
            unplanned_bytes=problem.unplanned_bytes,
            fp16_bytes=problem.fp16_bytes,
            predicted_error=point.predicted_error,
            metrics={
                "calibration": dict(point.calibration),
                "holdout": dict(point.holdout),
                **stated,
            },
        )

    plans = [plan_of(p) for p in points]
    if best is not None and best not in points:
        raise ValueError("the best point must be one of the published points")
    best_plan = plans[list(points).index(best)] if best is not None else None
    written = write_frontier(
        out_dir,
        model_ref=model_ref,
        model_sha256=model_sha256,
        budget=budget,
        points=[(plan, p.source) for plan, p in zip(plans, points, strict=True)],
        uniform=[(plan_of(p), p.source) for p in uniform],
        best=best_plan,
        scope=scope,
    )
    return JobOutputs(
        frontier_path=out_dir / "frontier.json",
        frontier=written,
        best_plan_id=plan_id_of(best_plan) if best_plan is not None else None,
    )
