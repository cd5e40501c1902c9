"""The scale benchmark: one ``--quick`` run end to end (tiny BERT and LLaMA, seconds).

The run must leave ``benchmarks/RESULTS.md`` alone, measure ``analyze`` and ``search`` for both
models with every pipeline stage, and count forward passes the way the pipeline makes them: the
reference stage runs the calibration split once and the held-out split once.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import scale
from benchmarks._common import RESULTS_PATH

SEARCH_STAGES = {"load", "collect", "analyze", "frontier", "reference", "search", "validate"}


def _results_text() -> str | None:
    return RESULTS_PATH.read_text(encoding="utf-8") if RESULTS_PATH.exists() else None


def test_a_quick_run_measures_every_stage_of_both_models(tmp_path: Path) -> None:
    before = _results_text()
    out = tmp_path / "report.json"
    assert scale.main(["--quick", "--json", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert _results_text() == before

    settings = scale.QUICK
    assert [s["subject"]["name"] for s in report["subjects"]] == ["minilm", "llama"]
    for sub in report["subjects"]:
        samples = sub["subject"]["samples"]
        held_out = round(samples * settings.holdout)
        calib = samples - held_out
        assert sub["checkpoint_bytes"] > 0 and sub["parameters"] > 0
        analyze, search = sub["runs"]["analyze"], sub["runs"]["search"]
        # analyze again with glibc's defaults, beside the CLI's fixed mmap threshold
        default_malloc = sub["runs"][scale.DEFAULT_MALLOC_RUN]
        assert "fixed_mmap_threshold" in analyze and "fixed_mmap_threshold" not in default_malloc
        assert {s["stage"] for s in default_malloc["stages"]} == {
            s["stage"] for s in analyze["stages"]
        }
        assert {s["stage"] for s in analyze["stages"]} >= {"load", "collect", "analyze"}
        stages = {s["stage"]: s for s in search["stages"]}
        assert set(stages) == SEARCH_STAGES
        # one pass over each split, in units of the calibration split
        assert stages["reference"]["forward_equivalents"] == round(1 + held_out / calib, 3)
        assert 0 < stages["search"]["forward_equivalents"] <= settings.trials
        assert stages["load"]["forward_equivalents"] == 0  # the data pass is collect's
        # fisher backpropagates through a share of the calibration batches, at most all
        assert 0 < stages["collect"]["forward_equivalents"] <= 1
        for run in (analyze, search):
            # sampled stage peaks never exceed the run's own high-water mark
            assert all(
                0 < s["peak_rss_bytes"] <= run["peak_rss_bytes"] + 2**20 for s in run["stages"]
            )
            assert run["rss_ratio"] == run["peak_rss_bytes"] / sub["rss_target_bytes"]
        total = sum(s["forward_equivalents"] for s in search["stages"])
        assert abs(sub["search_forward_equivalents"] - total) < 1e-9
        assert sub["forward_target"] == settings.trials + search["frontier_points"] + 6
        # the whole run took longer than its forwards alone
        assert scale.wall_equivalents(search) > stages["reference"]["forward_equivalents"]
