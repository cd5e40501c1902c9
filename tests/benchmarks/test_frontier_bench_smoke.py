"""benchmarks/frontier.py end to end in its --quick mode: every stage of both parts (frontier
vs uniform and baselines; frontier with vs without rounding choices) runs on a barely trained
tiny Llama, budgets hold, and both results sections and the SVG plot are written."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from benchmarks._frontier_points import pareto_holdout
from benchmarks.frontier import SECTION, main
from benchmarks.frontier_rounding import SECTION as ROUNDING_SECTION
from benchmarks.frontier_rounding import STAGES, StageClock
from bitplan.search.plans import FrontierPoint


def _point(total_bytes: int, error: float) -> FrontierPoint:
    return FrontierPoint(
        plan_id=f"p{total_bytes}-{error}",
        total_bytes=total_bytes,
        bpw=0.0,
        predicted_error=0.0,
        metrics={"calibration": {}, "holdout": {"error": error}},
        plan="plans/p.json",
        source="search",
    )


def test_pareto_holdout_keeps_only_undominated_points() -> None:
    points = [_point(10, 0.5), _point(8, 0.6), _point(12, 0.55), _point(8, 0.7), _point(14, 0.1)]
    assert [(p.total_bytes, p.holdout["error"]) for p in pareto_holdout(points)] == [
        (8, 0.6),
        (10, 0.5),
        (14, 0.1),
    ]


def test_stage_clock_buckets_reports_and_charges_silent_work_to_the_next_stage() -> None:
    ticks = iter([0.0, 1.0, 4.0, 5.0, 6.0, 9.0, 9.5, 12.0])
    clock = StageClock(now=lambda: next(ticks))  # started at 0
    for stage in ("load", "collect", "analyze", "reference", "search", "validate"):
        clock(stage, 1, 1)  # at 1, 4, 5, 6, 9, 9.5
    # the gap 1 -> 4 (a pass that reports nothing) counts as sensitivity; 9.5 -> 12 (work after
    # the last report) as validation
    assert clock.stop() == {"load": 1.0, "sensitivity": 4.0, "search": 4.0, "validation": 3.0}


def test_stage_clock_gives_a_silent_stage_no_time() -> None:
    ticks = iter([0.0, 2.0, 7.0, 8.0])
    clock = StageClock(now=lambda: next(ticks))
    clock("load", 1, 1)
    clock("search", 1, 1)  # a cached table: the sensitivity stage never reports
    assert clock.stop() == {"load": 2.0, "sensitivity": 0.0, "search": 5.0, "validation": 1.0}
    assert set(STAGES) == {"load", "sensitivity", "search", "validation"}


def test_quick_run_writes_results_and_plot(tmp_path: Path) -> None:
    results_md, plot = tmp_path / "RESULTS.md", tmp_path / "frontier.svg"
    run = main(["--quick", "--results", str(results_md), "--plot", str(plot)])

    (model,) = run.frontier
    (comp,) = model.comparisons
    assert model.n_layers == 37  # 5 blocks x 7 matrices + embeddings + lm_head
    assert comp.uniform == "int4-g128" and comp.uniform_error > 0
    assert comp.best is not None and comp.best.total_bytes <= comp.uniform_bytes
    for baseline in comp.baselines:
        assert baseline.total_bytes <= comp.uniform_bytes
        assert math.isfinite(baseline.error) and baseline.error >= 0
        if baseline.bitplan_bytes is not None:
            assert baseline.bitplan_bytes <= baseline.total_bytes
    assert {b.name for b in comp.baselines} == {"AIMET greedy", "HAWQ-V3 ILP"}
    assert 0 < comp.search.eval_s <= comp.search.wall_s
    assert all(p.total_bytes <= comp.uniform_bytes for p in model.points)

    text = results_md.read_text(encoding="utf-8")
    assert text.count(f"## {SECTION}") == 1
    for heading in (
        "(a) Frontier vs uniform",
        "(b) Optuna-refined",
        "(c) Baselines",
        "(d) Search overhead",
    ):
        assert heading in text
    assert "| tiny-llama | int4-g128 | HAWQ-V3 ILP |" in text

    (rounded,) = run.rounding
    (rc,) = rounded.comparisons
    assert rounded.is_lm and rounded.perplexity_ref is not None
    assert rounded.planned_weights > 0 and rounded.forward_s > 0 and rounded.stats_s > 0
    # the budget and the uniform plan are the frontier part's, measured by other code
    assert rc.uniform == "int4-g128" and rc.budget_bytes == comp.uniform_bytes
    assert rc.uniform_rtn is not None
    assert rc.uniform_rtn.error == pytest.approx(comp.uniform_error, rel=1e-9)
    # GPTQ stores the same bytes with other integers: another held-out error
    assert rc.uniform_gptq.total_bytes == rc.budget_bytes
    assert rc.uniform_gptq.error != rc.uniform_rtn.error
    assert rc.uniform_gptq.perplexity is not None and rc.uniform_gptq.perplexity > 0
    for job in (rc.rtn_only, rc.rounded):
        assert job.best is not None and job.best.total_bytes <= rc.budget_bytes
        assert sum(job.roundings_used.values()) == model.n_layers
        assert set(job.stages) == set(STAGES) and min(job.stages.values()) >= 0
        assert job.wall_s > 0
    assert rc.rtn_only.roundings_used == {"rtn": model.n_layers}
    assert rc.rounded.rounding == ["rtn", "gptq", "awq", "hqq"]
    assert rc.vs_rtn is not None and math.isfinite(rc.vs_rtn)
    assert text.count(f"## {ROUNDING_SECTION}") == 1
    rounding_text = text.split(f"## {ROUNDING_SECTION}")[1]
    assert f"| tiny-llama | int4-g128 | {rc.budget_bytes} |" in rounding_text
    assert "| tiny-llama | int4-g128 | rtn+gptq+awq+hqq |" in rounding_text
    assert "Largest model rounding ran on here: tiny-llama" in rounding_text
    assert "Fell short of a target: " in rounding_text

    svg = ET.parse(plot).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert svg.tag == f"{ns}svg"
    assert len(svg.findall(f"{ns}polyline")) == 1
    labels = {t.text for t in svg.findall(f"{ns}text")}
    assert {"tiny-llama", "int4-g128"} <= labels
