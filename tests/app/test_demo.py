"""``bitplan demo`` end to end in a temp folder: the embedded service, a real worker process
running the real pipeline on builtin:digits-cnn, and the downloaded results."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from bitplan.app.cli import app
from bitplan.search.plans import read_frontier, read_plan


def test_demo_runs_the_service_and_downloads_every_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["demo", "--trials", "8"])
    assert result.exit_code == 0, result.output

    out = tmp_path / "bitplan-demo"
    frontier = read_frontier(out / "frontier.json")
    assert frontier.model["ref"] == "builtin:digits-cnn" and frontier.points
    assert frontier.budget == {"kind": "bpw", "value": 4.0}
    for point in frontier.points + frontier.uniform:
        plan = read_plan(out / point.plan)  # validates the byte totals too
        assert plan.totals.total_bytes == point.total_bytes
        assert point.plan_id in result.stdout  # the frontier table lists every point
    # The search respects the budget: every frontier point is at most 4 bits per weight.
    assert max(p.bpw for p in frontier.points) <= 4.0
    table = pd.read_csv(out / "sensitivity.csv")
    layers = {lay.name for lay in read_plan(out / frontier.points[0].plan).layers}
    assert set(table["layer"]) == layers and (table["error"] >= 0).all()
    report = (out / "report.html").read_text()
    assert '<svg id="frontier-plot"' in report
    assert re.findall(r'href="(plans/[^"]+)"', report) == [
        p.plan for p in frontier.points + frontier.uniform
    ]
    # The worker process ran the job and stopped cleanly when the demo ended.
    log = (tmp_path / ".bitplan" / "demo" / "worker.log").read_text()
    assert "stopped after 1 job(s)" in log
