"""Smoke test of ``benchmarks/chunk_size.py`` (the scoring chunk sizes), so it does not rot."""

from __future__ import annotations

from benchmarks import chunk_size as bench
from bitplan.sensitivity import formats


def test_measure_times_every_scoring_and_the_table_shows_them() -> None:
    default = formats._CHUNK_ELEMENTS
    seconds = bench._measure(1 << 10, 1, shape=(48, 64))
    assert formats._CHUNK_ELEMENTS == default  # the quantizer's chunk size is put back
    assert set(seconds) == set(bench.SCORINGS)
    assert all(0 < s < 30 for s in seconds.values())
    text = bench._markdown({"glibc default": {1 << 10: seconds}}, 1)
    row = next(line for line in text.splitlines() if line.startswith("| glibc default | 1024 |"))
    assert row.count("|") == 3 + len(bench.SCORINGS) + 1  # every scoring has a cell
    assert "| 0.00390625 |" in row  # 1024 float32 elements in MiB
