"""Liveness and readiness, for people and orchestrators.

``GET /v1/health`` (liveness) answers 200 while the API and its database answer: restarting
the API would not bring back a worker on another machine, so missing workers only turn its
``status`` to ``degraded``. ``GET /v1/health/ready`` (readiness) is 503 with ``Retry-After``
while no worker can run jobs, so a load balancer stops sending submissions that would only wait.
Both report the live workers (counted from their presence rows, app/worker_presence.py, so
workers on other machines count too), the queue depth and the oldest queued job's age.
"""

from __future__ import annotations

import logging
import math
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from bitplan.app.api.deps import SessionDep, SettingsDep
from bitplan.app.models import Job, utcnow
from bitplan.app.problems import ProblemError, problem_responses
from bitplan.app.schemas import HealthRead
from bitplan.app.settings import Settings
from bitplan.app.states import JobState
from bitplan.app.worker_presence import count_alive

__all__ = ["router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["health"])


def _version() -> str:
    try:
        return version("bitplan")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _health(session: Session, settings: Settings) -> HealthRead:
    """The current figures; 503 (problem+json) when the database does not answer."""
    try:
        session.execute(text("SELECT 1"))
        now = utcnow()
        alive = count_alive(session, within_s=settings.lease_seconds, now=now)
        depth, oldest = session.execute(
            select(func.count(), func.min(Job.created_at)).where(Job.state == JobState.QUEUED)
        ).one()
    except SQLAlchemyError as exc:
        log.warning("health check: database unavailable: %s", exc)
        raise ProblemError(
            503,
            "the database is unavailable",
            slug="database-unavailable",
            headers={"Retry-After": _retry_after(settings)},
        ) from None
    age = None if oldest is None else now - oldest
    return HealthRead(
        status="ok" if alive else "degraded",
        version=_version(),
        workers_alive=alive,
        queue_depth=depth,
        oldest_queued_age_s=None if age is None else max(age.total_seconds(), 0.0),
    )


def _retry_after(settings: Settings) -> str:
    """Seconds to wait before asking again: a (re)started worker reports within a heartbeat."""
    return str(max(1, math.ceil(settings.heartbeat_seconds)))


@router.get("/health", response_model=HealthRead, responses=problem_responses(503))
def health(session: SessionDep, settings: SettingsDep) -> HealthRead:
    """Liveness: 200 while the API and its database are up (``status`` says whether workers
    are alive); 503 (problem+json) when the database is down."""
    return _health(session, settings)


@router.get("/health/ready", response_model=HealthRead, responses=problem_responses(503))
def ready(session: SessionDep, settings: SettingsDep) -> HealthRead:
    """Readiness: 200 when submitted jobs can run; 503 (problem+json, ``Retry-After``) when
    no worker is alive or the database is down."""
    report = _health(session, settings)
    if report.workers_alive == 0:
        raise ProblemError(
            503,
            f"no worker is alive to run jobs ({report.queue_depth} queued)",
            slug="no-workers",
            headers={"Retry-After": _retry_after(settings)},
            **report.model_dump(exclude={"status", "version"}),
        )
    return report
