"""The job states of DESIGN §9, in a module that imports nothing heavy.

The client and the CLI need them without SQLAlchemy or torch; the ORM, the queue, the API and the
worker use the same enum, so a state is spelled once.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["TERMINAL_STATES", "JobState"]


class JobState(StrEnum):
    """Where a job is: queued → running → one of the three terminal states."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
