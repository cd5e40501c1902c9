"""Liveness and readiness: ``GET /v1/health`` answers 200 while the database answers too."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from bitplan.app.api.deps import SessionDep
from bitplan.app.problems import ProblemError, problem_responses

__all__ = ["HealthRead", "router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["health"])


class HealthRead(BaseModel):
    """The service is up and its database answers."""

    status: str = Field(description="'ok'")
    version: str = Field(description="the installed bitplan version ('unknown' from a source tree)")


def _version() -> str:
    try:
        return version("bitplan")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


@router.get("/health", response_model=HealthRead, responses=problem_responses(503))
def health(session: SessionDep) -> HealthRead:
    """200 when the service and its database are up; 503 (problem+json) otherwise."""
    try:
        session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        log.warning("health check: database unavailable: %s", exc)
        raise ProblemError(
            503, "the database is unavailable", slug="database-unavailable"
        ) from None
    return HealthRead(status="ok", version=_version())
