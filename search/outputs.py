"""A job's artifacts: one plan file per frontier point, the frontier file and its CSV.

Layout of ``out_dir`` (the service serves these files as they are)::

    frontier.json        bitplan.frontier/v1: every point, the uniform baselines, plan paths
    frontier.csv         one row a point (uniform baselines included, marked by ``source``)
    plans/<plan_id>.json bitplan.plan/v1 for every frontier point
    sensitivity.csv      the sensitivity table (written by the analyze stage)
    layers.json          the planned layers (written by the analyze stage)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bitplan.search.budgets import Budget
from bitplan.search.plans import Plan, make_plan, write_frontier
from bitplan.search.problem import Problem
from bitplan.sensitivity.models import LoadedModel

__all__ = ["JobPaths", "PointRecord", "write_job_outputs"]


@dataclass
class PointRecord:
    """One measured plan: its choice, size, predicted error and measured metrics."""

    choice: dict[str, str]
    planned_bytes: int
    total_bytes: int
    bpw: float
    predicted_error: float
    calibration: dict[str, float]
    holdout: dict[str, float]
    source: str
    plan_id: str | None = field(default=None)


@dataclass
class JobPaths:
    frontier: Path
    plan_ids: list[str]


def write_job_outputs(
    *,
    out_dir: Path,
    model: LoadedModel,
    problem: Problem,
    budget: Budget,
    points: list[PointRecord],
    uniform: Sequence[PointRecord],
) -> JobPaths:
    """Write a plan per frontier point and per uniform baseline, and the frontier files.

    ``points`` are sorted by size in place and get their ``plan_id`` set.
    """

    def plan_of(point: PointRecord) -> Plan:
        return make_plan(
            model_ref=model.ref,
            model_sha256=model.sha256,
            layers=problem.layers,
            choice=point.choice,
            budget=budget,
            unplanned_bytes=problem.unplanned_bytes,
            fp16_bytes=problem.fp16_bytes,
            predicted_error=point.predicted_error,
            metrics={"calibration": point.calibration, "holdout": point.holdout},
        )

    points.sort(key=lambda p: p.total_bytes)
    written = write_frontier(
        out_dir,
        model_ref=model.ref,
        model_sha256=model.sha256,
        budget=budget,
        points=[(plan_of(p), "search") for p in points],
        uniform=[(plan_of(p), p.source) for p in uniform],
    )
    for point, entry in zip(points + list(uniform), written.points + written.uniform, strict=True):
        point.plan_id = entry.plan_id
    return JobPaths(
        frontier=out_dir / "frontier.json", plan_ids=[e.plan_id for e in written.points]
    )
