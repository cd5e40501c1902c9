"""``GET /v1/jobs/{id}/plans/{plan_id}/model?to=TARGET``: one plan of a succeeded job applied to
the job's model for a runtime, the service's ``bitplan apply MODEL PLAN --to TARGET``.

A worker makes the file (app/model_exports.py has the lifecycle, app/export_run.py the work);
this route queues it and serves it:

- **202** while the export is queued or running, with ``Retry-After``, ``Location`` (this URL)
  and a :class:`~bitplan.app.schemas.ModelExportRead`; the first GET queues it, and every GET
  after that finds the same row (a unique constraint; the loser of a race reads the winner's).
- **200** once it is ready: the file, streamed from disk — a single file as is (``model.gguf``,
  ``application/octet-stream``), a folder as one zip (``application/zip``) — with
  ``Content-Disposition``, ``Content-Length``, an ``ETag`` (the file's sha256; ``If-None-Match``
  answers **304**) and byte ranges.
- **409** until the job has succeeded (or when its model upload was deleted before the export
  was made), **404** for an unknown job or plan (another owner's job is unknown), **422** for
  an unknown target (the message lists the valid ones).
- A failed export: **422** with the target's own message when the target cannot express the
  plan (final: the same plan and target will never export); **503** with ``Retry-After`` when a
  runtime package is missing on the worker, or the export crashed or lost its worker. The first
  GET after that ``Retry-After`` queues it again (``Settings.export_retry_failed_s``), so a
  client that honours ``Retry-After`` gets the file once the operator has fixed the worker.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response, status
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from bitplan.app.api.deps import EngineDep, OwnerDep, SessionDep, SettingsDep
from bitplan.app.api.routes.jobs import JobId, PlanId, etag_matches, job_artifact, owned_job
from bitplan.app.export_run import ZIP_FILE
from bitplan.app.model_exports import (
    EXPORT_REFUSED,
    ExportSpec,
    enqueue_export,
    failure_problem,
    find_export,
    retry_at,
)
from bitplan.app.models import Job, utcnow
from bitplan.app.problems import ProblemError, problem_responses
from bitplan.app.queue import requeue_finished
from bitplan.app.schemas import BUILTIN_PREFIX, ModelExportRead
from bitplan.app.settings import Settings
from bitplan.app.states import JobState
from bitplan.search.targets import DEFAULT_TARGET, TARGETS

__all__ = ["router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# The ?to= choices are the target registry's names; a Literal, so OpenAPI lists them and an
# unknown one is a 422 that names them.
TargetName = Literal[tuple(TARGETS)]  # type: ignore[valid-type]
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_HEADER = {"schema": {"type": "string"}}
_IN_PROGRESS = (JobState.QUEUED, JobState.RUNNING)


def _location(job_id: str, plan_id: str, target: str) -> str:
    return f"/v1/jobs/{job_id}/plans/{plan_id}/model?to={target}"


def _needs_queueing(export: Job, settings: Settings) -> bool:
    """Whether this GET queues the export again: it failed for a reason that a retry may cure
    and the wait is over, or it succeeded but its file is gone (it is made again)."""
    if export.state == JobState.SUCCEEDED:
        return not _artifact_path(settings, export).is_file()
    if export.state in _IN_PROGRESS:
        return False
    when = retry_at(export, wait_s=settings.export_retry_failed_s)
    return when is not None and utcnow() >= when


def _artifact_path(settings: Settings, export: Job) -> Path:
    return settings.artifact_dir / export.id / str((export.result or {}).get("file", ZIP_FILE))


def _spec(job: Job, *, plan_id: str, target: str) -> ExportSpec:
    """What the worker needs; a 409 when the job's model upload has been deleted."""
    model = str(job.spec["model"])
    if job.model_id is None and not model.startswith(BUILTIN_PREFIX):
        raise ProblemError(
            409,
            f"the model of job {job.id} was deleted, so its plans cannot be applied to it; "
            "upload it again and submit a new job",
            slug="model-deleted",
        )
    return ExportSpec(
        parent_id=job.id,
        plan_id=plan_id,
        target=target,
        model=model,
        model_name=job.spec.get("model_name"),
    )


def _queue(
    session: Session,
    engine: Engine,
    settings: Settings,
    *,
    job: Job,
    export: Job | None,
    plan_id: str,
    to: str,
) -> Job:
    """Queue the export (``export`` is its row so far, None when there is none) and return the
    row as it now stands: queued by this request, or by another that won the race."""
    spec = _spec(job, plan_id=plan_id, target=to)
    session.commit()  # ends the read transaction (and frees its connection) before writing
    if export is None:
        enqueue_export(engine, parent=job, spec=spec, max_attempts=settings.max_attempts)
    elif requeue_finished(engine, job_id=export.id, lease_version=export.lease_version):
        log.info("export %s of job %s queued again", export.id, job.id)
    queued = find_export(session, parent_id=job.id, plan_id=plan_id, target=to)
    if queued is None:  # no insert won: this one's model upload was deleted since it was read
        session.refresh(job)
        _spec(job, plan_id=plan_id, target=to)  # the 409 a later request would get
        raise RuntimeError(f"the {to} export of job {job.id} plan {plan_id} vanished")
    return queued


def _accepted(export: Job, *, location: str, settings: Settings) -> JSONResponse:
    body = ModelExportRead(
        job_id=str(export.parent_id),
        plan_id=str(export.plan_id),
        target=str(export.target),
        state=JobState.RUNNING if export.state == JobState.RUNNING else JobState.QUEUED,
        stage=export.stage,
        progress=export.progress,
        eta_s=export.eta_s,
        attempts=export.attempts,
        links={"self": location},
    )
    headers = {"Retry-After": str(settings.export_retry_after_s), "Location": location}
    return JSONResponse(
        body.model_dump(mode="json"), status_code=status.HTTP_202_ACCEPTED, headers=headers
    )


def _failed(export: Job, settings: Settings) -> ProblemError:
    problem = failure_problem(export)
    if problem == EXPORT_REFUSED:
        return ProblemError(422, str(export.error), slug=problem)
    when = retry_at(export, wait_s=settings.export_retry_failed_s)
    assert when is not None  # only a refusal is final
    wait = max(1, math.ceil((when - utcnow()).total_seconds()))
    return ProblemError(
        503,
        f"the export failed: {export.error}; a request after {wait} s queues it again",
        slug=problem,
        headers={"Retry-After": str(wait)},
    )


def _download_name(export: Job) -> str:
    name = str((export.result or {}).get("file", ZIP_FILE))
    return f"{export.plan_id}-{export.target}.zip" if name == ZIP_FILE else name


@router.get(
    "/{job_id:job_id}/plans/{plan_id}/model",
    summary="One plan applied to the job's model for a runtime (bitplan apply --to)",
    response_class=Response,
    responses={
        200: {
            "description": "the model: one file as is (model.gguf), a folder as a zip",
            "content": {"application/octet-stream": _BINARY, "application/zip": _BINARY},
            "headers": {
                "ETag": {"description": "the file's sha256, for If-None-Match", **_HEADER},
                "Content-Disposition": {"description": "the file's name", **_HEADER},
            },
        },
        202: {
            "model": ModelExportRead,
            "description": "queued or being written by a worker: ask again after Retry-After",
            "headers": {
                "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}},
                "Location": {"description": "this URL, which serves the file", **_HEADER},
            },
        },
        304: {"description": "Not Modified (If-None-Match)"},
        **problem_responses(401, 404, 409),
    },
)
def get_model(
    job_id: JobId,
    plan_id: PlanId,
    session: SessionDep,
    settings: SettingsDep,
    owner_id: OwnerDep,
    engine: EngineDep,
    to: Annotated[
        TargetName,  # type: ignore[valid-type]  # a Literal built from the target registry
        Query(description="; ".join(f"{t.name}: {t.description}" for t in TARGETS.values())),
    ] = DEFAULT_TARGET,
    if_none_match: Annotated[
        str | None, Header(description="the ETag of an earlier download: 304 while unchanged")
    ] = None,
) -> Response:
    job = owned_job(session, owner_id, job_id)
    job_artifact(settings, job, f"plans/{plan_id}.json", what=f"plan {plan_id!r}")
    location = _location(job.id, plan_id, to)
    export = find_export(session, parent_id=job.id, plan_id=plan_id, target=to)
    if export is None or _needs_queueing(export, settings):
        export = _queue(session, engine, settings, job=job, export=export, plan_id=plan_id, to=to)
    if export.state in _IN_PROGRESS:
        return _accepted(export, location=location, settings=settings)
    if export.state != JobState.SUCCEEDED:
        raise _failed(export, settings)
    etag = f'"{str((export.result or {}).get("sha256", ""))[:32]}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if etag_matches(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return FileResponse(
        _artifact_path(settings, export),
        media_type=str((export.result or {}).get("media_type", "application/octet-stream")),
        filename=_download_name(export),
        headers=headers,
    )
