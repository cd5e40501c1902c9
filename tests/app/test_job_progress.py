"""Overall progress and ETA from per-stage reports, on a clock the test advances by hand."""

from __future__ import annotations

import pytest

from bitplan.app.job_progress import STAGE_WEIGHTS, ProgressSnapshot, ProgressTracker

INTERVAL_S = 0.5
STEP_S = 2.0**-10  # about 1 ms; a power of two, so 512 steps add up to exactly INTERVAL_S


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0  # any start: only differences matter

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _start(stage: str) -> float:
    """Where ``stage`` begins on the overall scale: the weights of the stages before it."""
    names = list(STAGE_WEIGHTS)
    return sum(STAGE_WEIGHTS[name] for name in names[: names.index(stage)])


def test_weights_cover_the_pipeline_stages_and_add_up_to_one() -> None:
    assert list(STAGE_WEIGHTS) == [
        "load",
        "collect",
        "analyze",
        "frontier",
        "reference",
        "search",
        "validate",
    ]
    assert sum(STAGE_WEIGHTS.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="add up to 1"):
        ProgressTracker(interval_s=INTERVAL_S, weights={"load": 0.5})


def test_overall_progress_only_grows_while_stage_progress_restarts(clock: FakeClock) -> None:
    """The sequence a 'weight'-method job reports (no 'collect'), including the 'reference'
    stage that two callers report with different totals, written on every call."""
    tracker = ProgressTracker(interval_s=0.0, clock=clock)
    reports = [
        ("load", 0, 2),
        ("load", 1, 2),
        ("load", 2, 2),
        ("analyze", 1, 4),
        ("analyze", 4, 4),
        ("frontier", 3, 3),
        ("reference", 0, 2),
        ("reference", 30, 60),  # a batch loop inside the step of the line above
        ("reference", 1, 2),
        ("reference", 10, 60),  # the next split's batch loop: the stage fraction drops
        ("reference", 2, 2),
        ("search", 1, 40),
        ("search", 40, 40),
        ("validate", 3, 3),
    ]
    snapshots = []
    for stage, done, total in reports:
        clock.advance(1.0)
        snapshot = tracker.update(stage, done, total)
        assert snapshot is not None
        snapshots.append(snapshot)
    overall = [s.progress for s in snapshots]
    assert overall == sorted(overall) and overall[-1] == 1.0
    stage = [s.stage_progress for s in snapshots]
    assert stage[:4] == [0.0, 0.5, 1.0, 0.25]  # back to a quarter when 'analyze' starts
    assert stage[9] == round(10 / 60, 3) and overall[9] == overall[8]  # dropped, held
    # 'collect' was skipped: 'analyze' starts where 'collect' would have ended
    assert snapshots[3].progress == round(_start("analyze") + STAGE_WEIGHTS["analyze"] / 4, 3)


def test_unknown_stage_keeps_the_overall_value(clock: FakeClock) -> None:
    tracker = ProgressTracker(interval_s=0.0, clock=clock)
    clock.advance(1.0)
    before = tracker.update("load", 2, 2)
    clock.advance(1.0)
    custom = tracker.update("my-own-step", 1, 3)
    assert before is not None and custom is not None
    assert custom.progress == before.progress == STAGE_WEIGHTS["load"]
    assert (custom.stage, custom.stage_progress) == ("my-own-step", round(1 / 3, 3))


def test_etas_extrapolate_the_time_spent(clock: FakeClock) -> None:
    tracker = ProgressTracker(interval_s=0.0, clock=clock)
    assert tracker.update("load", 0, 2) == ProgressSnapshot(
        stage="load", stage_progress=0.0, stage_eta_s=None, progress=0.0, eta_s=None
    )
    clock.advance(10.0)
    tracker.update("load", 2, 2)  # 10 s for the first 5 %
    clock.advance(30.0)
    snapshot = tracker.update("search", 10, 40)  # 'search' started 0 s ago
    search_done = _start("search") + STAGE_WEIGHTS["search"] / 4
    assert snapshot is not None and snapshot.progress == round(search_done, 3)
    assert snapshot.stage_eta_s == 0.0  # no time spent in the stage yet
    assert snapshot.eta_s == round(40 * (1 - snapshot.progress) / snapshot.progress)
    clock.advance(5.0)
    later = tracker.update("search", 20, 40)
    assert later is not None and later.stage_eta_s == 5.0  # 5 s for 10 trials, 20 to go


def test_writes_are_throttled_but_never_skip_a_stage_change_or_end(clock: FakeClock) -> None:
    tracker = ProgressTracker(interval_s=INTERVAL_S, clock=clock)
    written: list[tuple[str, int]] = []
    for stage, total in (("analyze", 2000), ("search", 3)):
        for done in range(1, total + 1):
            if tracker.update(stage, done, total) is not None:
                written.append((stage, done))
            clock.advance(STEP_S)
    # the first report, then one every 512 steps (0.5 s), the end of each stage, and the new
    # stage at once
    assert written == [
        ("analyze", 1),
        ("analyze", 513),
        ("analyze", 1025),
        ("analyze", 1537),
        ("analyze", 2000),
        ("search", 1),
        ("search", 3),
    ]


def test_an_unchanged_snapshot_is_not_written_again(clock: FakeClock) -> None:
    tracker = ProgressTracker(interval_s=INTERVAL_S, clock=clock)
    assert tracker.update("load", 2, 2) is not None
    assert tracker.update("load", 2, 2) is None  # the same rounded values: same ETag
