"""StageRecorder: stages split at name changes, RSS peaks per stage, forward-equivalents."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bitplan.search import stage_stats
from bitplan.search.stage_stats import StageRecorder, format_stages, rss_bytes, watch_forwards
from tests.helpers import wait_until

MB = 2**20


def _by_name(recorder: StageRecorder) -> dict[str, dict[str, object]]:
    return {s["stage"]: s for s in recorder.stages()}


def _peak(recorder: StageRecorder, stage: str) -> int:
    value = _by_name(recorder)[stage]["peak_rss_bytes"]
    assert isinstance(value, int), f"{stage}: no RSS recorded"
    return value


def test_reports_pass_through_and_a_stage_seen_again_adds_to_its_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]  # a clock the test moves: sleeps on a busy machine overrun
    monkeypatch.setattr(stage_stats, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    seen: list[tuple[str, int, int]] = []
    with StageRecorder(lambda s, d, t: seen.append((s, d, t))) as recorder:
        recorder("load", 0, 2)
        now[0] += 0.05
        recorder("search", 1, 3)
        now[0] += 0.15
        recorder("load", 2, 2)
        now[0] += 0.05
    assert seen == [("load", 0, 2), ("search", 1, 3), ("load", 2, 2)]
    stages = recorder.stages()
    assert [s["stage"] for s in stages] == ["load", "search"]  # first-seen order, once each
    load, search = stages
    assert search["seconds"] == pytest.approx(0.15)
    assert load["seconds"] == pytest.approx(0.1)  # both visits


@pytest.mark.skipif(rss_bytes() is None, reason="this platform does not report RSS")
def test_peak_rss_belongs_to_the_stage_that_held_the_memory() -> None:
    with StageRecorder(interval_s=0.01) as recorder:
        recorder("small", 0, 1)
        time.sleep(0.05)
        recorder("big", 0, 1)
        held = torch.ones(300 * MB // 4)  # 300 MB, every page touched

        def sampled() -> bool:  # the sampler thread saw it (no report during "big" since)
            return _peak(recorder, "big") - _peak(recorder, "small") > 250 * MB

        wait_until(sampled, "the RSS sampler seeing 300 MB held during 'big'", within_s=10)
        del held
        recorder("after", 0, 1)
        time.sleep(0.05)
    stages = _by_name(recorder)
    small, big, after = (int(stages[n]["peak_rss_bytes"]) for n in ("small", "big", "after"))  # type: ignore[call-overload]
    assert big - small > 250 * MB
    assert big - after > 250 * MB


def test_forward_equivalents_count_samples_of_the_watched_module() -> None:
    module = nn.Linear(3, 2)
    with StageRecorder() as recorder:
        recorder("before", 0, 1)
        module(torch.zeros(4, 3))  # not watched yet: not counted
        watch_forwards(recorder, module, samples_per_pass=10)
        recorder("reference", 0, 1)
        module(torch.zeros(5, 3))
        module(input=torch.zeros(5, 3))  # keyword inputs, as module(**batch) passes them
        recorder("search", 0, 1)
        module(torch.zeros(20, 3))
    module(torch.zeros(7, 3))  # after the recorder closed: the hook is gone
    stages = _by_name(recorder)
    assert stages["before"]["forward_equivalents"] == 0.0
    assert stages["reference"]["forward_equivalents"] == 1.0
    assert stages["search"]["forward_equivalents"] == 2.0
    assert not module._forward_pre_hooks


def test_without_a_watched_module_forwards_are_unknown_and_other_callbacks_are_not_watched() -> (
    None
):
    module = nn.Linear(3, 2)
    seen: list[str] = []
    watch_forwards(lambda s, d, t: seen.append(s), module, samples_per_pass=10)  # no effect
    assert not module._forward_pre_hooks
    with StageRecorder() as recorder:
        recorder("load", 0, 1)
        module(torch.zeros(5, 3))
    assert recorder.stages()[0]["forward_equivalents"] is None


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        StageRecorder(interval_s=0)
    with pytest.raises(ValueError, match="samples_per_pass"):
        StageRecorder().watch(nn.Linear(1, 1), samples_per_pass=0)


def test_format_stages_shows_one_line_per_stage_and_dashes_for_unknowns() -> None:
    text = format_stages(
        [
            {
                "stage": "load",
                "seconds": 1.25,
                "peak_rss_bytes": 512 * MB,
                "forward_equivalents": None,
            },
            {"stage": "search", "seconds": 3.0, "peak_rss_bytes": None, "forward_equivalents": 4.5},
        ]
    )
    header, load, search = text.splitlines()
    assert "peak RSS MiB" in header
    assert load.split() == ["load", "1.2", "512", "-"]
    assert search.split() == ["search", "3.0", "-", "4.50"]


def test_a_process_without_cuda_reads_no_gpu_peak_and_initialises_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def touched(*_: object) -> int:
        raise AssertionError("a CPU job must not touch CUDA's memory counters")

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", touched)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", touched)
    assert stage_stats.gpu_peak_bytes() is None
    with StageRecorder() as recorder:
        recorder("load", 0, 1)
        recorder("search", 0, 1)
    assert [s["peak_gpu_bytes"] for s in recorder.stages()] == [None, None]
    assert "GPU" not in format_stages(recorder.stages())  # no column of dashes on a CPU job


def test_gpu_peak_is_read_and_reset_at_every_stage_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    # The allocator's peak since the previous read: before the job, during load, during search,
    # during load again.
    peaks = iter([900 * MB, 100 * MB, 300 * MB, 50 * MB])
    monkeypatch.setattr(stage_stats, "gpu_peak_bytes", lambda: next(peaks))
    with StageRecorder() as recorder:  # reads (and drops) what came before the job
        recorder("load", 0, 2)
        recorder("load", 1, 2)  # the same stage: nothing read
        recorder("search", 0, 1)
        recorder("load", 2, 2)
    stages = _by_name(recorder)
    assert stages["load"]["peak_gpu_bytes"] == 100 * MB  # the larger of its two visits
    assert stages["search"]["peak_gpu_bytes"] == 300 * MB
    assert next(peaks, None) is None  # one read a switch, one at the start, one at the end


def test_format_stages_adds_a_gpu_column_when_a_stage_used_the_gpu() -> None:
    text = format_stages(
        [
            {"stage": "load", "seconds": 1.25, "peak_rss_bytes": 512 * MB, "peak_gpu_bytes": None},
            {"stage": "search", "seconds": 3.0, "peak_rss_bytes": None, "peak_gpu_bytes": 96 * MB},
        ]
    )
    header, load, search = text.splitlines()
    assert "peak GPU MiB" in header
    assert load.split() == ["load", "1.2", "512", "-", "-"]
    assert search.split() == ["search", "3.0", "-", "96", "-"]
