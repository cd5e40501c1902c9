"""benchmarks/frontier.py end to end in its --quick mode: every stage runs on a barely trained
tiny Llama, budgets hold, and the results section and the SVG plot are written."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks.frontier import SECTION, main, pareto_holdout
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


def test_quick_run_writes_results_and_plot(tmp_path: Path) -> None:
    results_md, plot = tmp_path / "RESULTS.md", tmp_path / "frontier.svg"
    results = main(["--quick", "--results", str(results_md), "--plot", str(plot)])

    (model,) = results
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

    svg = ET.parse(plot).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert svg.tag == f"{ns}svg"
    assert len(svg.findall(f"{ns}polyline")) == 1
    labels = {t.text for t in svg.findall(f"{ns}text")}
    assert {"tiny-llama", "int4-g128"} <= labels
