"""benchmarks/blockwise_memory.py in its ``--quick`` mode: a tiny LLaMA analysed and searched
whole and block-wise, each in a fresh process. The run must leave ``benchmarks/RESULTS.md``
alone, agree on the tables and the frontiers, and report sane memory and times."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import blockwise_memory
from benchmarks._common import RESULTS_PATH


def _results_text() -> str | None:
    return RESULTS_PATH.read_text(encoding="utf-8") if RESULTS_PATH.exists() else None


def test_a_quick_run_compares_whole_and_blockwise_runs(tmp_path: Path) -> None:
    before = _results_text()
    out = tmp_path / "report.json"
    assert blockwise_memory.main(["--quick", "--json", str(out)]) == 0
    assert _results_text() == before
    report = json.loads(out.read_text(encoding="utf-8"))

    runs = {(r["command"], r["mode"]): r for r in report["runs"]}
    assert set(runs) == {(c, m) for c in ("analyze", "search") for m in ("whole", "blockwise")}
    assert all(r["peak_rss_bytes"] > report["checkpoint_bytes"] > 0 for r in report["runs"])
    assert all(r["seconds"] > 0 for r in report["runs"])
    assert report["tables_identical"] and report["frontiers_identical"]
    assert report["frontier_points"] >= 2  # at least a point and a uniform baseline
    text = blockwise_memory.to_markdown(report, "machine")
    assert "| search | blockwise | mmap 1 MiB |" in text
