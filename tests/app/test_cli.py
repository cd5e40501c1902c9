"""The planning commands of the `bitplan` CLI: output files, summaries, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from bitplan.app.cli import app
from bitplan.search.artifact import load_artifact, tensor_bytes_of
from bitplan.search.plans import read_plan
from bitplan.sensitivity.models import load_model

runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_formats_lists_bits_per_weight() -> None:
    out = _ok(["formats"])
    assert "int4-g128" in out and "4.125" in out and "fp8-e4m3" in out


def test_analyze_writes_table_and_prints_summary(tmp_path: Path) -> None:
    out = _ok(
        [
            "analyze",
            "builtin:digits-cnn",
            "--calib",
            "builtin",
            "--method",
            "weight",
            "-o",
            str(tmp_path),
            "--device",
            "cpu",
        ]
    )
    table = pd.read_csv(tmp_path / "sensitivity.csv")
    assert set(table["format"]) == {"int8", "int6-g128", "int4-g128", "int3-g64", "int2-g32-asym"}
    assert len(table) == 6 * 5
    assert "conv1" in out and "sensitivity.csv" in out
    assert json.loads((tmp_path / "layers.json").read_text())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["analyze", "builtin:nope", "-o", "x"], "builtin"),
        (["analyze", "builtin:digits-cnn", "--formats", "int7", "-o", "x"], "accepted"),
        (["analyze", "builtin:digits-cnn", "--method", "magic", "-o", "x"], "accepted"),
        (["analyze", "builtin:digits-cnn", "--pin", "fc1", "-o", "x"], "PATTERN=FORMAT"),
        (["search", "builtin:digits-cnn", "--budget", "lots", "-o", "x"], "accepted"),
        (
            ["search", "builtin:digits-cnn", "--budget", "0.5bpw", "-o", "x", "--device", "cpu"],
            "smallest reachable size",
        ),
        (["solve", "missing.csv", "-o", "x"], "missing.csv"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_search_then_apply_writes_exact_bytes(tmp_path: Path) -> None:
    out = _ok(
        [
            "search",
            "builtin:digits-cnn",
            "--budget",
            "4.5bpw",
            "--trials",
            "6",
            "--device",
            "cpu",
            "--batch-size",
            "256",
            "-o",
            str(tmp_path / "job"),
        ]
    )
    assert "Pareto frontier" in out and "u-int8" in out
    frontier = json.loads((tmp_path / "job" / "frontier.json").read_text())
    plan_path = tmp_path / "job" / frontier["points"][-1]["plan"]
    _ok(["apply", "builtin:digits-cnn", str(plan_path), "-o", str(tmp_path / "packed")])
    plan = read_plan(plan_path)
    assert tensor_bytes_of(tmp_path / "packed" / "model.safetensors") == plan.totals.total_bytes
    fresh = load_model("builtin:digits-cnn", device="cpu")
    load_artifact(tmp_path / "packed", fresh.module)


def test_solve_on_a_user_table(tmp_path: Path) -> None:
    rows = [
        {"layer": f"l{i}", "format": f, "error": e * (i + 1), "numel": 4096}
        for i in range(4)
        for f, e in (("int8", 0.01), ("int4-g128", 0.2), ("int2-g32", 1.0))
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    out = _ok(["solve", str(tmp_path / "t.csv"), "--budget", "5bpw", "-o", str(tmp_path / "o")])
    assert "best under 5bpw" in out
    frontier = json.loads((tmp_path / "o" / "frontier.json").read_text())
    assert frontier["points"] and all(
        (tmp_path / "o" / p["plan"]).is_file() for p in frontier["points"]
    )
