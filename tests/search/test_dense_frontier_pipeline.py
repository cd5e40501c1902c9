"""run_job reports how far the sensitivity proxy was from the measured trials."""

from __future__ import annotations

import math
from pathlib import Path

from bitplan.app.summary import proxy_gap_note
from bitplan.search.pipeline import run_job
from bitplan.search.spec import JobSpec


def test_job_result_carries_the_proxy_gap(tmp_path: Path, bitplan_cache_dir: Path) -> None:
    spec = JobSpec(
        model="builtin:digits-cnn",
        budget="4bpw",
        method="weight",
        trials=10,
        device="cpu",
        batch_size=128,
    )
    result = run_job(spec, out_dir=tmp_path / "job", cache_dir=bitplan_cache_dir)
    gap = result.proxy_gap
    assert gap is not None and gap.trials == 10
    assert gap.median_ratio > 0 and -1.0 <= gap.spearman <= 1.0
    assert math.isfinite(gap.scaled_error) and math.isfinite(gap.corrected_error)
    note = proxy_gap_note(gap)
    assert note is not None and note.startswith("proxy vs measured over 10 trials")
