"""Smoke tests of ``benchmarks/gpu_stages.py``, so the figures of a CUDA run never rot: a CPU
run of a tiny job (seconds), the table with a CUDA column, and a clear refusal without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_stages


def test_a_cpu_run_reports_every_stage_and_writes_its_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As in a process that never used CUDA (on a GPU machine, tests before this one may have).
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    figures = tmp_path / "figures.json"
    argv = ["--models", "digits-cnn", "--devices", "cpu", "--trials", "3", "--max-samples", "64"]
    runs = gpu_stages.main([*argv, "--json", str(figures)])
    assert [(r["model"], r["device"]) for r in runs] == [("builtin:digits-cnn", "cpu")]
    stages = {s["stage"]: s for s in runs[0]["stages"]}
    assert {"load", "analyze", "search", "validate"} <= set(stages)
    assert not any(name.startswith("training") for name in stages)  # trained before the clock
    assert all(s["peak_gpu_bytes"] is None for s in stages.values())
    # Each figure is rounded to the millisecond: the stages' sum may pass the total by that much.
    rounding = 0.0005 * (len(stages) + 1)
    assert 0 < sum(s["seconds"] for s in stages.values()) <= runs[0]["seconds"] + rounding
    assert json.loads(figures.read_text())["runs"] == runs
    printed = capsys.readouterr().out
    assert "### builtin:digits-cnn" in printed and "| stage | cpu s |" in printed
    assert "GPU" not in printed  # no CUDA column on a CPU run


def _run(device: str, seconds: float, gpu: int | None) -> dict[str, object]:
    stage = {"stage": "analyze", "seconds": seconds, "peak_gpu_bytes": gpu}
    return {
        "model": "builtin:tiny-lm",
        "device": device,
        "seconds": seconds + 1,
        "stages": [stage],
        "best_holdout_error": 0.25,
    }


def test_the_table_puts_devices_side_by_side_with_cudas_memory() -> None:
    runs = [_run("cpu", 2.0, None), _run("cuda", 0.5, 96 * 2**20)]
    text = gpu_stages.render(runs, ["cpu", "cuda"], "note")
    assert "| stage | cpu s | cuda s | cuda peak GPU MiB |" in text
    assert "| analyze | 2.00 | 0.50 | 96 |" in text
    assert "| **whole job** | **3.00** | **1.50** | |" in text
    assert "held-out error: cpu 0.25, cuda 0.25" in text


def test_cuda_without_a_device_is_refused_before_any_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_stages.main(["--devices", "cpu,cuda"])
