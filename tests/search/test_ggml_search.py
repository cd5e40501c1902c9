"""A search in llama.cpp's block formats, end to end through the CLI, on builtin:tiny-lm.

tiny-lm's matrices have rows of 64 weights (attention, embeddings, fc_in) and 256 (fc_out), so
the 256-weight k-quants fit only fc_out and every other layer takes llama.cpp's fallback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from bitplan.app.cli import app
from bitplan.search.artifact import tensor_bytes_of
from bitplan.search.plans import read_frontier, read_plan
from bitplan.sensitivity.formats import applicable_format, parse_format

runner = CliRunner()
FORMATS = ("q8_0", "q4_0", "q4_k", "q2_k")


@pytest.fixture(autouse=True)
def _restore_quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI quiets Hugging Face through environment variables; undo that after each test."""
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_search_and_apply_in_llama_cpp_formats(tmp_path: Path) -> None:
    job = tmp_path / "job"
    _ok(
        ["search", "builtin:tiny-lm", "--formats", ",".join(FORMATS), "--budget", "6bpw"]
        + ["--trials", "2", "--method", "weight", "--device", "cpu"]
        + ["--max-samples", "16", "--max-length", "32", "-o", str(job)]
    )
    cols = {lay["name"]: lay["shape"][1] for lay in json.loads((job / "layers.json").read_text())}
    assert set(cols.values()) == {64, 256}

    table = pd.read_csv(job / "sensitivity.csv")
    for layer, part in table.groupby("layer"):
        want = {applicable_format(parse_format(f), cols[str(layer)]).name for f in FORMATS}
        assert set(part["format"]) == want  # no row in a format the layer cannot be stored in
    assert set(table[table["format"] == "q4_k"]["layer"]) == {
        name for name, c in cols.items() if c == 256
    }

    frontier = read_frontier(job / "frontier.json")
    assert {u.plan_id for u in frontier.uniform} == {f"u-{f}" for f in FORMATS}
    uniform_q4_k = read_plan(job / "plans" / "u-q4_k.json")
    assert {lay.name: lay.format.name for lay in uniform_q4_k.layers} == {
        name: ("q4_k" if c == 256 else "q5_0")
        for name, c in cols.items()  # llama.cpp's fallback
    }
    for point in frontier.points + frontier.uniform:
        plan = read_plan(job / point.plan)
        assert all(lay.format.applies_to(cols[lay.name]) for lay in plan.layers)

    best = read_plan(job / "plans" / "best.json")
    out = _ok(["apply", "builtin:tiny-lm", str(job / "plans" / "best.json"), "-o", str(tmp_path)])
    assert f"{best.totals.total_bytes} tensor bytes" in " ".join(out.split())
    assert tensor_bytes_of(tmp_path / "model.safetensors") == best.totals.total_bytes
