"""Model exports: one plan of a succeeded job applied to the job's model for a runtime target,
made by a worker (``GET /v1/jobs/{id}/plans/{plan_id}/model?to=TARGET``).

An export is a row of ``jobs`` with ``kind = 'export'`` (:class:`~bitplan.app.states.JobKind`)
rather than a table of its own: the queue's one-statement claim, lease, heartbeat, fencing by
lease version, reaper with bounded attempts, staging folder with its atomic rename, and the sweep
that knows the staging names all apply to it unchanged, with no second queue to keep in step.
The user's job routes see only ``search`` rows (:mod:`bitplan.app.crud`).

Life of an export:

- The first GET queues it (:func:`enqueue_export`). ``(parent_id, plan_id, target)`` is unique,
  so a GET that loses the insert race to another reads the winner's row: one export however
  many clients ask.
- A worker claims it, writes the target into its staging folder with the same registry as
  ``bitplan apply`` (:mod:`bitplan.app.export_run`), packs it (one file as is, a folder as a
  reproducible zip) and publishes it with its size and sha256 in the row's ``result``.
- A failure records its kind in ``result["problem"]``: :data:`EXPORT_REFUSED` (the target cannot
  express the plan, or the model does not load: the same inputs would fail again, so it is
  final and a 422), :data:`RUNTIME_UNAVAILABLE` (the target's runtime packages are missing on
  the worker: a 503). A failure without one (a crash, a worker lost ``max_attempts`` times) is
  :data:`EXPORT_FAILED`, a 503 too. A GET at least ``Settings.export_retry_failed_s`` after a
  failure that is not final queues the same row again
  (:func:`bitplan.app.queue.requeue_finished`, fenced like every queue write, so of two racing
  GETs one requeues it).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bitplan.app.models import Job, new_id, utcnow
from bitplan.app.states import JobKind
from bitplan.search.plans import PLAN_ID_PATTERN
from bitplan.search.targets import TARGETS
from bitplan.sensitivity.errors import InputError

__all__ = [
    "EXPORT_FAILED",
    "EXPORT_REFUSED",
    "RUNTIME_UNAVAILABLE",
    "ExportSpec",
    "RuntimeUnavailable",
    "enqueue_export",
    "failure_problem",
    "find_export",
    "plan_file",
    "retry_at",
]

log = logging.getLogger(__name__)

# The kinds of failure an export records (problem slugs of app/problems.py's tag URIs).
EXPORT_REFUSED = "export-refused"  # the target's own refusal: final, 422
RUNTIME_UNAVAILABLE = "runtime-unavailable"  # the worker lacks the target's packages: 503
EXPORT_FAILED = "export-failed"  # a crash or a lost worker: 503
_PLAN_ID = re.compile(PLAN_ID_PATTERN)


class RuntimeUnavailable(Exception):
    """The worker cannot write this target: its runtime packages are not installed here."""


@dataclass(frozen=True)
class ExportSpec:
    """What a worker needs to make one export (the row's ``spec``): the job whose plan it
    applies, the plan, the target, and the job's model as the worker opens it (a builtin or the
    stored upload) with the name results give it (the uploaded file's name, never a path)."""

    parent_id: str
    plan_id: str
    target: str
    model: str
    model_name: str | None = None

    def __post_init__(self) -> None:
        if not _PLAN_ID.fullmatch(self.plan_id):
            raise InputError(f"plan id {self.plan_id!r} does not match {PLAN_ID_PATTERN}")
        if self.target not in TARGETS:
            raise InputError(f"unknown target {self.target!r}; accepted: {', '.join(TARGETS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportSpec:
        """The spec a row stores; unknown or missing fields are an :class:`InputError`."""
        names = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"unknown export fields: {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as error:  # a missing field
            raise InputError(f"incomplete export spec: {error}") from None


def plan_file(artifact_dir: Path, *, parent_id: str, plan_id: str) -> Path:
    """Where the worker that ran job ``parent_id`` published plan ``plan_id``."""
    return artifact_dir / parent_id / "plans" / f"{plan_id}.json"


def find_export(session: Session, *, parent_id: str, plan_id: str, target: str) -> Job | None:
    """The export of this job's plan for ``target``, if one was ever queued, as the database
    has it now (a row this session read before is refreshed)."""
    return session.scalar(
        select(Job)
        .where(
            Job.kind == JobKind.EXPORT.value,
            Job.parent_id == parent_id,
            Job.plan_id == plan_id,
            Job.target == target,
        )
        .execution_options(populate_existing=True)
    )


def enqueue_export(engine: Engine, *, parent: Job, spec: ExportSpec, max_attempts: int) -> bool:
    """Queue ``spec``'s export for ``parent``'s owner; False when another request queued it
    first (the unique constraint refused this insert; that row stands and serves both)."""
    statement = insert(Job).values(
        id=new_id(),
        kind=JobKind.EXPORT.value,
        owner_id=parent.owner_id,
        parent_id=parent.id,
        plan_id=spec.plan_id,
        target=spec.target,
        spec=spec.to_dict(),
        # The export reads the job's upload: while it waits or runs, the upload is in use
        # (crud.delete_blob refuses to delete it).
        model_id=parent.model_id,
        max_attempts=max_attempts,
    )
    try:
        with engine.begin() as connection:
            connection.execute(statement)
    except IntegrityError:
        log.info(
            "export of %s %s to %s: queued by another request", parent.id, spec.plan_id, spec.target
        )
        return False
    log.info("export of job %s plan %s to %s queued", parent.id, spec.plan_id, spec.target)
    return True


def failure_problem(export: Job) -> str:
    """The kind of a failed export's failure: one of the slugs above."""
    recorded = (export.result or {}).get("problem")
    return recorded if recorded in (EXPORT_REFUSED, RUNTIME_UNAVAILABLE) else EXPORT_FAILED


def retry_at(export: Job, *, wait_s: float) -> datetime | None:
    """When a GET may queue this failed export again; None when its failure is final."""
    if failure_problem(export) == EXPORT_REFUSED:
        return None
    return (export.finished_at or utcnow()) + timedelta(seconds=wait_s)
