"""A job's overall progress and ETA, derived from the per-stage progress the pipeline reports.

The pipeline reports ``progress(stage, done, total)`` per stage, and every stage restarts at 0
(``load`` 2/2, then ``analyze`` 1/40, ...), so a stage fraction alone jumps back and forth
(0.5 → 0.2 → 0 → 1.0 ...). The REST API shows both: the stage's own fraction and ETA, and an
overall fraction that only grows, from 0 at the claim to 1 when the job succeeds.

Overall progress = the weights of the stages already passed + the current stage's weight × its
fraction (:data:`STAGE_WEIGHTS`, in the order the pipeline runs them). A stage that a job skips
(``collect`` for the data-free ``weight`` method; ``analyze`` when its table is cached) counts as
passed once a later stage reports. A stage name the weights do not know (a custom runner's)
leaves the overall value where it was. The overall ETA extrapolates the time spent so far
linearly over the overall fraction, so it is as good as the weights are for the job at hand.

:class:`ProgressTracker` also throttles: it hands the worker a snapshot to write at most every
``interval_s`` seconds (plus at every stage change and stage end), rounded so that an unchanged
job keeps its ETag and pollers get 304s. Its clock is injectable, so tests need no sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import accumulate

__all__ = ["EXPORT_STAGE_WEIGHTS", "STAGE_WEIGHTS", "ProgressSnapshot", "ProgressTracker"]

# Rough share of a job's wall time per stage, in pipeline order (search/pipeline.py); they add
# up to 1. Estimated from what each stage does, not measured per model: the measured search
# (every trial is a model evaluation) dominates, the sensitivity data pass and per-layer scoring
# come next, and the exact frontier is a short dynamic programme. Only the ETA's accuracy
# depends on them; progress stays monotone whatever they are.
STAGE_WEIGHTS: Mapping[str, float] = {
    "load": 0.05,  # model and data; the first use of a builtin model trains it first
    "collect": 0.10,  # the calibration data pass of the 'layer' and 'fisher' methods
    "analyze": 0.20,  # per-layer sensitivity scores
    "frontier": 0.05,  # the exact proxy frontier
    "reference": 0.05,  # full-precision outputs on the calibration and held-out splits
    "search": 0.45,  # the measured Optuna search
    "validate": 0.10,  # re-measuring every frontier point on the held-out split
}

# The same for a model export (app/export_run.py): writing the target (loading the model and
# quantizing every layer) is nearly all of it; packing is a copy of the bytes and their hash.
EXPORT_STAGE_WEIGHTS: Mapping[str, float] = {"export": 0.9, "package": 0.1}


@dataclass(frozen=True)
class ProgressSnapshot:
    """What the job row shows: the current stage's fraction/ETA and the whole job's."""

    stage: str
    stage_progress: float
    stage_eta_s: float | None
    progress: float
    eta_s: float | None


def _eta(elapsed: float, fraction: float) -> float | None:
    """Seconds left at the rate so far, in whole seconds (None before any progress)."""
    if not 0 < fraction <= 1 or elapsed < 0:
        return None
    return float(round(elapsed / fraction * (1 - fraction)))


class ProgressTracker:
    """Turns a runner's ``progress(stage, done, total)`` calls into throttled snapshots.

    ``update`` returns the snapshot to write, or None when nothing needs writing yet.
    """

    def __init__(
        self,
        *,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        weights: Mapping[str, float] = STAGE_WEIGHTS,
    ) -> None:
        if abs(sum(weights.values()) - 1) > 1e-9:
            raise ValueError(f"stage weights must add up to 1, got {sum(weights.values())}")
        self._clock, self._interval_s = clock, interval_s
        self._weights = dict(weights)
        # where each stage starts on the overall scale: the sum of the weights before it
        self._starts = dict(zip(weights, accumulate(weights.values(), initial=0.0), strict=False))
        self._started = clock()
        self._stage: tuple[str, float] | None = None  # (name, clock at its first report)
        self._overall = 0.0
        self._last_write: float | None = None
        self._written: ProgressSnapshot | None = None

    def _overall_of(self, stage: str, fraction: float) -> float:
        if stage not in self._weights:
            return self._overall
        # max: monotone even when a stage reports a smaller fraction than before, or when a
        # stage that was counted as skipped reports after all
        return max(self._overall, self._starts[stage] + self._weights[stage] * fraction)

    def update(self, stage: str, done: int, total: int) -> ProgressSnapshot | None:
        now = self._clock()
        new_stage = self._stage is None or self._stage[0] != stage
        if self._stage is None or new_stage:  # the None test narrows the type for mypy
            self._stage = (stage, now)
        fraction = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
        self._overall = self._overall_of(stage, fraction)
        due = self._last_write is None or now - self._last_write >= self._interval_s
        if not (new_stage or done >= total or due):
            return None
        overall = round(self._overall, 3)  # 0.1 %: finer changes are invisible to a person
        snapshot = ProgressSnapshot(
            stage=stage,
            stage_progress=round(fraction, 3),
            stage_eta_s=_eta(now - self._stage[1], fraction) if done > 0 else None,
            progress=overall,
            eta_s=_eta(now - self._started, overall),
        )
        self._last_write = now
        if snapshot == self._written:
            return None
        self._written = snapshot
        return snapshot
