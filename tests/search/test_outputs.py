"""``publish``: where an algorithm's Point becomes a published FrontierPoint and its plan file."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from bitplan.search.budgets import parse_budget
from bitplan.search.outputs import best_measured, publish
from bitplan.search.plans import read_frontier, read_plan
from bitplan.search.points import Point, choice_names
from bitplan.search.problem import LayerRow, Problem, build_problem
from bitplan.sensitivity.formats import parse_format, tensor_bytes

INT8, INT4 = parse_format("int8"), parse_format("int4-g32")


def _problem() -> Problem:
    layers = [
        LayerRow(name=n, param=f"{n}.weight", numel=64 * 32, kind="linear", shape=(64, 32))
        for n in ("a", "b")
    ]
    table = pd.DataFrame(
        [
            {"layer": n, "format": f.name, "error": e}
            for n, errors in (("a", (0.1, 2.0)), ("b", (0.3, 5.0)))
            for f, e in zip((INT8, INT4), errors, strict=True)
        ]
    )
    return build_problem(table, layers, unplanned_bytes=100, fp16_bytes=2 * 2 * 64 * 32 + 100)


def test_problem_point_is_sized_and_predicted_by_the_additive_model() -> None:
    problem = _problem()
    point = problem.point({"a": INT4, "b": INT8}, source="search", number=3)
    assert point.planned_bytes == tensor_bytes(INT4, 64, 32) + tensor_bytes(INT8, 64, 32)
    assert point.predicted_error == pytest.approx(2.3)
    assert (point.source, point.number) == ("search", 3)
    assert point.calibration == {} and math.isnan(point.error)  # not measured yet


def test_publish_carries_each_point_into_its_plan_and_frontier_entry(tmp_path: Path) -> None:
    problem = _problem()

    def measured(choice: dict, calib: float, source: str) -> Point:
        point = problem.point(choice, source=source)
        return replace(point, calibration={"error": calib}, holdout={"error": 2 * calib})

    small = measured({"a": INT4, "b": INT4}, 0.5, "search")
    mixed = measured({"a": INT4, "b": INT8}, 0.2, "search")
    uniform = measured({"a": INT8, "b": INT8}, 0.01, "uniform:int8")
    best = best_measured([small, mixed])
    assert best is mixed  # the lowest calibration error among the points, not the baselines
    written = publish(
        tmp_path,
        model_ref="builtin:toy",
        model_sha256="ab" * 32,
        problem=problem,
        budget=parse_budget("6bpw"),
        points=[mixed, small],
        uniform=[uniform],
        best=best,
    )
    frontier = read_frontier(written.frontier_path)
    assert frontier == written.frontier
    assert [p.source for p in frontier.points] == ["search", "search"]
    assert [p.holdout["error"] for p in frontier.points] == [1.0, 0.4]  # smallest first
    entry = next(p for p in frontier.points if p.plan_id == written.best_plan_id)
    assert entry.total_bytes == mixed.planned_bytes + problem.unplanned_bytes
    assert entry.predicted_error == pytest.approx(2.3)
    plan = read_plan(tmp_path / entry.plan)
    assert choice_names(plan.choice()) == choice_names(mixed.choice)
    assert read_plan(tmp_path / "plans" / "best.json") == plan
    assert [u.plan_id for u in frontier.uniform] == ["u-int8"]
    assert written.plan_ids == [p.plan_id for p in frontier.points] + ["u-int8"]


def test_publish_refuses_a_best_point_it_does_not_publish(tmp_path: Path) -> None:
    problem = _problem()
    listed = problem.point({"a": INT4, "b": INT4}, source="exact")
    other = problem.point({"a": INT8, "b": INT8}, source="exact")
    with pytest.raises(ValueError, match="one of the published points"):
        publish(
            tmp_path,
            model_ref="builtin:toy",
            model_sha256="ab" * 32,
            problem=problem,
            budget=None,
            points=[listed],
            best=other,
        )
    assert not (tmp_path / "frontier.json").exists()
