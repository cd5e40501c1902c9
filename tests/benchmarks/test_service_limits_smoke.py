"""The service limits benchmark: one round end to end, and how it counts and judges.

The ``--quick`` round starts the real service (``bitplan serve`` with keys on, no worker) on
loopback, sends the unkeyed 256 MiB body and the 100000-layer zip once each, and must leave
``benchmarks/RESULTS.md`` alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS_PATH
from benchmarks.service_limits import _bytes_left, to_markdown

ROOT = Path(__file__).resolve().parents[2]
# One server start-up (it imports torch) and one check in a fresh process (torch and
# transformers again), on a busy 2-core machine.
ROUND_TIMEOUT_S = 300


def _results_text() -> str | None:
    return RESULTS_PATH.read_text(encoding="utf-8") if RESULTS_PATH.exists() else None


def test_a_quick_round_refuses_both_hostile_uploads(tmp_path: Path) -> None:
    before = _results_text()
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.service_limits", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=ROUND_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cases = json.loads(out.read_text(encoding="utf-8"))["cases"]
    assert set(cases) == {"unkeyed", "huge"}
    (unkeyed,), (huge,) = cases["unkeyed"], cases["huge"]
    assert unkeyed["status"] == 401 and unkeyed["sent_mb"] < 256  # answered before the end
    assert huge["status"] == 422 and "100000 layers" in huge["detail"]
    assert huge["bytes_left"] == 0 and huge["check_cpu_s"] > 0  # a child did the check
    assert _results_text() == before


def _run(**overrides: Any) -> dict[str, Any]:
    return {
        "status": 422,
        "seconds": 1.0,
        "check_cpu_s": 1.0,
        "growth_mb": 1.0,
        "bytes_left": 0,
        "sent_mb": 3.0,
        "detail": "d",
        **overrides,
    }


def test_the_verdicts_follow_the_targets() -> None:
    report = {
        "machine": "m",
        "load_average": 1.0,
        "repeat": 2,
        "huge_zip_bytes": 4000,
        "cases": {
            "unkeyed": [_run(status=401), _run(status=401, growth_mb=70.0)],
            "huge": [_run(), _run(seconds=6.0, bytes_left=10)],
            "tiny": [_run(status=201), _run(status=201)],
        },
    }
    text = to_markdown(report)
    assert "(a) the API's RSS grew at most 70.0 MB" in text and "missed (< 64 MB)" in text
    assert "at most 6.00 s" in text and "missed (< 5 s)" in text
    assert "(c) bytes left by the refused zips: 10: missed (0)" in text
    report["cases"] = {name: runs[:1] for name, runs in report["cases"].items()}  # type: ignore[attr-defined]
    text = to_markdown(report)
    assert "missed" not in text and text.count("met") == 4


def test_bytes_left_counts_new_and_grown_files_only() -> None:
    before = {"a": 10, "b": 5}
    assert _bytes_left(before, {"a": 10, "b": 5}) == 0
    assert _bytes_left(before, {"a": 12, "c": 7}) == 2 + 7  # b removed: nothing left by it
