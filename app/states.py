"""The job states of DESIGN §9 and the kinds of queued work, in a module that imports nothing
heavy.

The client and the CLI need them without SQLAlchemy or torch; the ORM, the queue, the API and the
worker use the same enums, so a state (or a kind) is spelled once.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["TERMINAL_STATES", "JobKind", "JobState"]


class JobState(StrEnum):
    """Where a job is: queued → running → one of the three terminal states."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class JobKind(StrEnum):
    """What a queued row asks a worker for. ``search`` is a user's planning job; ``export`` is
    one plan of a succeeded job applied to its model for a runtime (``GET
    /v1/jobs/{id}/plans/{plan_id}/model``), queued by the API and never listed as a job."""

    SEARCH = "search"
    EXPORT = "export"
