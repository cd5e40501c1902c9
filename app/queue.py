"""The job queue: jobs are rows, workers lease them.

Following procrastinate's design: the claim is one statement; heartbeats belong to workers;
recovery is an idempotent reaper; losing a race is normal and handled.

- :func:`claim_job` picks the oldest queued job (of either
  :class:`~bitplan.app.states.JobKind`, first come first served) and marks it running in one
  ``UPDATE``. On PostgreSQL its subquery is ``FOR UPDATE SKIP LOCKED``, so concurrent workers
  skip each other's rows. SQLAlchemy drops ``FOR UPDATE`` on SQLite, so there the statement
  runs in a ``BEGIN IMMEDIATE`` transaction (one writer at a time) and re-checks ``state =
  'queued'``.
- A claim starts the attempt's progress at 0 (a retried job starts over).
- Each claim increments ``lease_version``. Every later write of the holder (heartbeat,
  progress, finish, release) is fenced by ``(id, lease_version, state = 'running')``: once a
  lease is reaped or reclaimed, the old holder's writes match no row and return False.
- :func:`reap_expired` returns jobs whose lease ran out to the queue, until ``max_attempts``
  claims were made; then the job fails with a reason. Running it twice changes nothing.

All times are the worker's clock (timezone-aware UTC); workers sharing a database are assumed
to have synchronised clocks (NTP), with leases of tens of seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, func, literal, select, update
from sqlalchemy.sql.dml import Update

from bitplan.app.job_progress import ProgressSnapshot
from bitplan.app.models import Job, UTCDateTime, utcnow
from bitplan.app.states import TERMINAL_STATES, JobKind, JobState

__all__ = [
    "ClaimedJob",
    "claim_job",
    "finish_job",
    "heartbeat",
    "is_cancel_requested",
    "reap_expired",
    "release_job",
    "requeue_finished",
    "set_progress",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs to run one claimed job."""

    id: str
    spec: dict[str, Any]
    lease_version: int
    attempts: int
    kind: str = JobKind.SEARCH.value  # what the spec describes: a search or an export


def _fenced(job_id: str, lease_version: int) -> Update:
    """An UPDATE that only the current lease holder's writes can match."""
    return update(Job).where(
        Job.id == job_id, Job.lease_version == lease_version, Job.state == JobState.RUNNING
    )


# What a job that nobody runs shows: no lease, nothing to wait for.
_UNLEASED: dict[str, Any] = {
    "lease_owner": None,
    "lease_expires_at": None,
    "eta_s": None,
    "stage_eta_s": None,
}
# A job back in the queue: its next attempt starts from nothing.
_REQUEUED: dict[str, Any] = {
    **_UNLEASED,
    "state": JobState.QUEUED,
    "stage": JobState.QUEUED.value,
    "progress": 0.0,
    "stage_progress": 0.0,
}


def _ended(state: JobState, now: datetime) -> dict[str, Any]:
    """The values of a job that has just reached the terminal ``state``."""
    return {**_UNLEASED, "state": state, "stage": state.value, "finished_at": now}


@contextmanager
def _writing(engine: Engine) -> Iterator[Connection]:
    """A write transaction; on SQLite it takes the write lock first (BEGIN IMMEDIATE)."""
    with engine.connect() as connection:
        connection.execution_options(sqlite_immediate=True)
        with connection.begin():
            yield connection


def _write(engine: Engine, statement: Update) -> int:
    with _writing(engine) as connection:
        return connection.execute(statement).rowcount


def claim_job(
    engine: Engine, *, worker_id: str, lease_s: float, now: datetime | None = None
) -> ClaimedJob | None:
    """Lease the oldest queued job to ``worker_id`` for ``lease_s`` seconds; None when idle."""
    now = now or utcnow()
    oldest = (
        select(Job.id)
        .where(Job.state == JobState.QUEUED)
        .order_by(Job.created_at, Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)  # PostgreSQL; dropped on SQLite (BEGIN IMMEDIATE)
        .scalar_subquery()
    )
    statement = (
        update(Job)
        .where(Job.id == oldest, Job.state == JobState.QUEUED)
        .values(
            state=JobState.RUNNING,
            stage="starting",
            progress=0.0,
            stage_progress=0.0,
            eta_s=None,
            stage_eta_s=None,
            lease_owner=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_s),
            lease_version=Job.lease_version + 1,
            attempts=Job.attempts + 1,
            started_at=func.coalesce(Job.started_at, literal(now, UTCDateTime())),
        )
        .returning(Job.id, Job.spec, Job.lease_version, Job.attempts, Job.kind)
    )
    with _writing(engine) as connection:
        row = connection.execute(statement).first()
    if row is None:
        return None
    logger.info(
        "worker %s claimed %s job %s (attempt %d)", worker_id, row.kind, row.id, row.attempts
    )
    return ClaimedJob(
        id=row.id,
        spec=row.spec,
        lease_version=row.lease_version,
        attempts=row.attempts,
        kind=row.kind,
    )


def heartbeat(
    engine: Engine,
    *,
    job_id: str,
    worker_id: str,
    lease_version: int,
    lease_s: float,
    now: datetime | None = None,
) -> bool:
    """Extend the lease; False when it was lost (reaped, reclaimed, or the job finished)."""
    expires = (now or utcnow()) + timedelta(seconds=lease_s)
    statement = _fenced(job_id, lease_version).where(Job.lease_owner == worker_id)
    return _write(engine, statement.values(lease_expires_at=expires)) == 1


def set_progress(
    engine: Engine, *, job_id: str, lease_version: int, snapshot: ProgressSnapshot
) -> bool:
    """Record the stage and the stage's and the whole job's fraction done (0..1) and ETA;
    fenced like every holder write."""
    statement = _fenced(job_id, lease_version).values(
        stage=snapshot.stage,
        stage_progress=min(max(snapshot.stage_progress, 0.0), 1.0),
        stage_eta_s=snapshot.stage_eta_s,
        progress=min(max(snapshot.progress, 0.0), 1.0),
        eta_s=snapshot.eta_s,
    )
    return _write(engine, statement) == 1


def finish_job(
    engine: Engine,
    *,
    job_id: str,
    lease_version: int,
    state: JobState,
    result: dict[str, Any] | None = None,
    error: str | None = None,
) -> bool:
    """Move a running job to a terminal state; False when the caller no longer holds it. A
    failed or cancelled job keeps the progress it had made."""
    if state not in TERMINAL_STATES:
        accepted = ", ".join(sorted(TERMINAL_STATES))
        raise ValueError(f"finish_job needs one of {accepted}, got {state!r}")
    values = {**_ended(JobState(state), utcnow()), "result": result, "error": error}
    if state == JobState.SUCCEEDED:
        values |= {"progress": 1.0, "stage_progress": 1.0}
    return _write(engine, _fenced(job_id, lease_version).values(**values)) == 1


def release_job(engine: Engine, *, job_id: str, lease_version: int) -> bool:
    """Give a job back to the queue unfinished (graceful shutdown); the attempt is not counted."""
    statement = _fenced(job_id, lease_version).values(**_REQUEUED, attempts=Job.attempts - 1)
    return _write(engine, statement) == 1


def requeue_finished(engine: Engine, *, job_id: str, lease_version: int) -> bool:
    """Queue a finished job again as if new (attempts from 0, no error, no result); False when
    it is no longer finished at ``lease_version`` (another caller requeued it first, and a
    worker may hold it by now). For exports that a later request retries
    (app/model_exports.py); a planning job is never run twice."""
    statement = (
        update(Job)
        .where(
            Job.id == job_id,
            Job.lease_version == lease_version,
            Job.state.in_(TERMINAL_STATES),
        )
        .values(
            **_REQUEUED,
            attempts=0,
            error=None,
            result=None,
            cancel_requested=False,
            started_at=None,
            finished_at=None,
        )
    )
    return _write(engine, statement) == 1


def is_cancel_requested(engine: Engine, *, job_id: str) -> bool:
    with engine.connect() as connection:
        return bool(connection.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def reap_expired(engine: Engine, *, now: datetime | None = None) -> int:
    """Requeue running jobs whose lease expired (their worker died); a job that has used all
    its attempts fails with a reason instead, and one whose cancel was requested is cancelled.
    Returns the number of jobs changed. Idempotent and safe to run from every worker."""
    now = now or utcnow()
    with engine.connect() as connection:
        expired = connection.execute(
            select(
                Job.id,
                Job.lease_version,
                Job.lease_owner,
                Job.attempts,
                Job.max_attempts,
                Job.cancel_requested,
            ).where(Job.state == JobState.RUNNING, Job.lease_expires_at < now)
        ).all()
    changed = 0
    for row in expired:
        # Fenced on the version seen and still expired: a heartbeat or a reaper racing us wins.
        statement = _fenced(row.id, row.lease_version).where(Job.lease_expires_at < now)
        values: dict[str, Any]
        if row.cancel_requested:
            values = _ended(JobState.CANCELLED, now)
        elif row.attempts >= row.max_attempts:
            reason = (
                f"worker lost: the lease of {row.lease_owner} expired on attempt "
                f"{row.attempts} of {row.max_attempts}; not retried"
            )
            values = {**_ended(JobState.FAILED, now), "error": reason}
        else:
            values = _REQUEUED
        if _write(engine, statement.values(**values)) == 1:
            changed += 1
            logger.warning(
                "reaped job %s of worker %s (attempt %d of %d): now %s",
                row.id,
                row.lease_owner,
                row.attempts,
                row.max_attempts,
                values["state"],
            )
    return changed
