"""A job's artifacts: one plan file per frontier point, the frontier file and its CSV.

Layout of ``out_dir`` (the service serves these files as they are)::

    frontier.json        bitplan.frontier/v1: every point, the uniform baselines, plan paths
    frontier.csv         one row a point (uniform baselines included, marked by ``source``)
    plans/<plan_id>.json bitplan.plan/v1 for every frontier point and uniform baseline
    plans/best.json      a copy of the best plan under the budget (the lowest calibration error)
    sensitivity.csv      the sensitivity table (written by the analyze stage)
    layers.json          the planned layers (written by the analyze stage)

The best plan is chosen on the calibration split, the one the search optimised: choosing it by
the held-out numbers would make them no longer held out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bitplan.search.budgets import Budget
from bitplan.search.plans import FrontierFile, Plan, make_plan, plan_id_of, write_frontier
from bitplan.search.problem import Problem

__all__ = ["JobOutputs", "Measured", "write_job_outputs"]


@dataclass(frozen=True)
class Measured:
    """A choice and what was measured of it: the input of a frontier point's plan."""

    choice: Mapping[str, str]
    calibration: Mapping[str, float]
    holdout: Mapping[str, float]
    source: str


@dataclass(frozen=True)
class JobOutputs:
    """What :func:`write_job_outputs` wrote: the frontier file (its points and uniform baselines
    name exactly the plan files written) and the best plan's id (also ``plans/best.json``)."""

    frontier_path: Path
    frontier: FrontierFile
    best_plan_id: str | None

    @property
    def plan_ids(self) -> list[str]:
        """Every plan file written under ``plans/`` by its own id (``best.json`` is a copy)."""
        return [p.plan_id for p in self.frontier.points + self.frontier.uniform]


def write_job_outputs(
    *,
    out_dir: Path,
    model_ref: str,
    model_sha256: str,
    problem: Problem,
    budget: Budget,
    points: Sequence[Measured],
    uniform: Sequence[Measured],
) -> JobOutputs:
    """Write a plan per frontier point and per uniform baseline, ``best.json`` and the frontier
    files."""

    def plan_of(point: Measured) -> Plan:
        return make_plan(
            model_ref=model_ref,
            model_sha256=model_sha256,
            layers=problem.layers,
            choice=point.choice,
            budget=budget,
            unplanned_bytes=problem.unplanned_bytes,
            fp16_bytes=problem.fp16_bytes,
            predicted_error=problem.cost(point.choice)[1],
            metrics={"calibration": dict(point.calibration), "holdout": dict(point.holdout)},
        )

    plans = [(plan_of(p), p.source) for p in points]
    best = min(plans, key=lambda pair: pair[0].metrics["calibration"]["error"], default=None)
    written = write_frontier(
        out_dir,
        model_ref=model_ref,
        model_sha256=model_sha256,
        budget=budget,
        points=plans,
        uniform=[(plan_of(p), p.source) for p in uniform],
        best=best[0] if best is not None else None,
    )
    return JobOutputs(
        frontier_path=out_dir / "frontier.json",
        frontier=written,
        best_plan_id=plan_id_of(best[0]) if best is not None else None,
    )
