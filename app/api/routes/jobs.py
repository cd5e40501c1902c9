"""``/v1/jobs``: submit, inspect, list and cancel planning jobs, and fetch their results.

- ``POST /v1/jobs`` answers **202** with ``Location`` and the queued job. With an
  ``Idempotency-Key`` header, the same key and the same body answer 202 again with the same job
  (in its current state); the same key with another body is a 422 problem. A worker
  process runs the job; the API never runs jobs itself.
- ``GET /v1/jobs/{id}`` carries a strong ``ETag`` over the job's representation, so a poller
  sending ``If-None-Match`` gets **304** until something changes.
- ``GET /v1/jobs`` pages newest first with an opaque ``cursor``.
- ``POST /v1/jobs/{id}:cancel``: a queued job is cancelled at once, a running one stops at its
  next check (between layers or trials); a job that already succeeded or failed is a 409.
- Results (``/frontier``, ``/plans/{plan_id}``, ``/sensitivity``, ``/report``) are read from
  ``artifact_dir/<id>/``, which a worker fills only when the job succeeds: 409 until then. A
  plan applied to the job's model for a runtime (``/plans/{plan_id}/model``) is made by a
  worker on request: :mod:`bitplan.app.api.routes.model_export`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response, status
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, PlainTextResponse
from sqlalchemy.orm import Session
from starlette.convertors import Convertor, register_url_convertor

from bitplan.app import crud
from bitplan.app.api.deps import OwnerDep, PageCursor, PageLimit, SessionDep, SettingsDep
from bitplan.app.models import Blob, Job
from bitplan.app.problems import ProblemError, problem_responses
from bitplan.app.schemas import (
    BUILTIN_CALIB,
    BUILTIN_PREFIX,
    FrontierPointRead,
    FrontierRead,
    JobCreate,
    JobRead,
    JobRequestRead,
    JobsRead,
)
from bitplan.app.settings import Settings
from bitplan.app.states import JobState
from bitplan.search.exports import EXPORTS
from bitplan.search.fields import as_format
from bitplan.search.plans import PLAN_ID_PATTERN, FrontierPoint, read_frontier, read_plan

__all__ = ["JobId", "PlanId", "etag_matches", "job_artifact", "owned_job", "router"]

log = logging.getLogger(__name__)


class _JobIdConvertor(Convertor[str]):
    """A job id in a path: one segment without ``:``. Ids are UUIDs, and the colon starts a
    custom method (``/v1/jobs/{id}:cancel``): without this, ``/v1/jobs/x:cancel`` would also
    match ``/v1/jobs/{job_id}``, so ``GET`` on it would be a 404 for job ``x:cancel`` and a 405
    there would advertise ``GET`` as allowed."""

    regex = "[^/:]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


# Starlette resolves "{name:convertor}" when a route is declared, so this precedes the routes.
register_url_convertor("job_id", _JobIdConvertor())

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# The ?format= choices are the export registry's names; a Literal, so OpenAPI lists them.
PlanFormat = Literal[tuple(EXPORTS)]  # type: ignore[valid-type]
# The pattern documents what _JobIdConvertor routes: an id never holds ":" (nor "/").
JobId = Annotated[
    str, PathParam(pattern="^[^/:]+$", description="the job's id (from POST /v1/jobs)")
]
PlanId = Annotated[
    str, PathParam(pattern=PLAN_ID_PATTERN, description="a plan id from the job's frontier")
]
_LOCATION = {"Location": {"description": "the job's URL", "schema": {"type": "string"}}}
_ETAG = {"ETag": {"description": "validator for If-None-Match", "schema": {"type": "string"}}}


def _links(job: Job) -> dict[str, str]:
    base = f"/v1/jobs/{job.id}"
    return {
        "self": base,
        "cancel": f"{base}:cancel",
        "frontier": f"{base}/frontier",
        "sensitivity": f"{base}/sensitivity",
        "report": f"{base}/report",
    }


def _request_of(job: Job) -> JobRequestRead:
    """The request as submitted: resource ids, not the server paths the worker uses."""
    builtin = str(job.spec.get("model", ""))
    model = job.model_id or (builtin if builtin.startswith(BUILTIN_PREFIX) else "deleted")
    builtin_calib = job.spec.get("calib") == BUILTIN_CALIB
    calib = job.dataset_id or (BUILTIN_CALIB if builtin_calib else "deleted")
    fields = {name: job.spec[name] for name in JobCreate.model_fields if name in job.spec}
    # The stored spec holds format names; the schema holds parsed formats.
    fields["formats"] = [as_format(name) for name in fields.get("formats", [])]
    fields["pins"] = {pattern: as_format(name) for pattern, name in fields.get("pins", {}).items()}
    # model_construct: the stored spec was validated on submission; a deleted resource shows as
    # "deleted" rather than failing the read.
    return JobRequestRead.model_construct(**{**fields, "model": model, "calib": calib})


def _job_read(job: Job) -> JobRead:
    done = job.state == JobState.SUCCEEDED
    plans = (job.result or {}).get("plan_ids", []) if done else []
    stages = (job.result or {}).get("stages", []) if done else []
    return JobRead(
        id=job.id,
        state=job.state,
        stage=job.stage,
        progress=job.progress,
        eta_s=job.eta_s,
        stage_progress=job.stage_progress,
        stage_eta_s=job.stage_eta_s,
        attempts=job.attempts,
        error=job.error,
        cancel_requested=job.cancel_requested,
        request=_request_of(job),
        plans=plans,
        stages=stages,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        updated_at=job.updated_at,
        links=_links(job),
    )


def _etag(payload: bytes) -> str:
    digest = hashlib.sha256(payload).hexdigest()
    return f'"{digest[:32]}"'  # 128 bits tell versions apart; the full hash adds nothing


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 §13.1.2: weak comparison against a list of tags or ``*``."""
    if not if_none_match:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def owned_job(session: Session, owner_id: str | None, job_id: str) -> Job:
    job = crud.get_job(session, job_id=job_id, owner_id=owner_id)
    if job is None:
        raise ProblemError(404, f"no job with id {job_id!r}", slug="not-found")
    return job


def _resolve(session: Session, owner_id: str | None, *, kind: str, ref: str) -> Blob:
    """The uploaded resource ``ref`` of this owner: the worker opens its path, results and
    errors name it by its file name."""
    blob = crud.get_blob(session, blob_id=ref, owner_id=owner_id, kind=kind)
    if blob is None:
        builtin = "'builtin:<name>'" if kind == "model" else "'builtin'"
        raise ProblemError(
            422,
            f"no {kind} with id {ref!r}; upload it with POST /v1/{kind}s or use {builtin}",
            slug="unknown-resource",
        )
    return blob


def _request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@router.post(
    "",
    response_model=JobRead,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Submit a planning job",
    responses={
        202: {"description": "queued (or replayed)", "headers": _LOCATION},
        **problem_responses(401),
    },
)
def create_job(
    body: JobCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    owner_id: OwnerDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=255,
            description="a key of your choice: retrying with the same key and body returns the "
            "same job instead of queueing another",
        ),
    ] = None,
) -> JobRead:
    model = None
    if not body.model.startswith(BUILTIN_PREFIX):
        model = _resolve(session, owner_id, kind="model", ref=body.model)
    dataset = None
    if body.calib != BUILTIN_CALIB:
        dataset = _resolve(session, owner_id, kind="dataset", ref=body.calib)
    spec = body.to_spec(model=model, dataset=dataset)
    request_hash = _request_hash(body)
    try:
        job = crud.create_job(
            session,
            owner_id=owner_id,
            spec=spec.to_dict(),
            model_id=model.id if model else None,
            dataset_id=dataset.id if dataset else None,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            max_attempts=settings.max_attempts,
        )
    except crud.IdempotencyMismatch as exc:
        raise ProblemError(422, str(exc), slug="idempotency-key-reused") from None
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    log.info("job %s queued (%s, %s)", job.id, body.model, body.method)
    return _job_read(job)


@router.get(
    "", response_model=JobsRead, summary="List jobs, newest first", responses=problem_responses(401)
)
def list_jobs(
    session: SessionDep,
    owner_id: OwnerDep,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    limit: PageLimit = 50,
    cursor: PageCursor = None,
) -> JobsRead:
    jobs, next_cursor = crud.list_jobs(
        session, owner_id=owner_id, state=state, limit=limit, cursor=cursor
    )
    return JobsRead(data=[_job_read(job) for job in jobs], next_cursor=next_cursor)


@router.get(
    "/{job_id:job_id}",
    response_model=JobRead,
    summary="Get a job's state, progress and links",
    responses={
        200: {"headers": _ETAG},
        304: {"description": "Not Modified (If-None-Match)"},
        **problem_responses(401, 404, 405),
    },
    # The 405: `/v1/jobs/{id}:cancel` is the cancel action's URL, which takes POST only.
    description="The job; a 405 for an id ending in `:cancel` (that URL is the cancel action, "
    "POST only).",
)
def get_job(
    job_id: JobId,
    session: SessionDep,
    owner_id: OwnerDep,
    if_none_match: Annotated[
        str | None, Header(description="the ETag of a previous answer: 304 while unchanged")
    ] = None,
) -> Response:
    # Serialised once: the same bytes are hashed for the ETag and sent as the body.
    payload = _job_read(owned_job(session, owner_id, job_id)).model_dump_json().encode()
    etag = _etag(payload)
    # no-cache: caches may keep the body but must revalidate, so pollers always see news.
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if etag_matches(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(payload, media_type="application/json", headers=headers)


@router.post(
    "/{job_id:job_id}:cancel",
    response_model=JobRead,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Cancel a job",
    responses=problem_responses(401, 404, 409),
)
def cancel_job(job_id: JobId, session: SessionDep, owner_id: OwnerDep) -> JobRead:
    job = owned_job(session, owner_id, job_id)
    if job.state in (JobState.SUCCEEDED, JobState.FAILED):
        raise ProblemError(
            409,
            f"job {job_id} already {job.state}; nothing to cancel",
            slug="job-finished",
            state=job.state,
        )
    cancelled = crud.request_cancel(session, job_id=job_id, owner_id=owner_id)
    assert cancelled is not None  # it existed a statement ago and jobs are never deleted
    log.info("job %s: cancel requested (state %s)", job_id, cancelled.state)
    return _job_read(cancelled)


def job_artifact(
    settings: Settings, job: Job, name: str, *, what: str, missing_status: int = 404
) -> Path:
    """A result file of a succeeded job; 409 before it succeeded, ``missing_status`` when the
    job has no such file."""
    if job.state != JobState.SUCCEEDED:
        raise ProblemError(
            409,
            f"job {job.id} is {job.state}; its {what} is ready once it has succeeded",
            slug="not-ready",
            state=job.state,
        )
    path = settings.artifact_dir / job.id / name
    if not path.is_file():
        slug = "not-ready" if missing_status == 409 else "not-found"
        raise ProblemError(
            missing_status, f"job {job.id} has no {what} (yet)", slug=slug, state=job.state
        )
    return path


@router.get(
    "/{job_id:job_id}/frontier",
    response_model=FrontierRead,
    summary="The size/quality frontier",
    responses=problem_responses(401, 404, 409),
)
def get_frontier(
    job_id: JobId, session: SessionDep, settings: SettingsDep, owner_id: OwnerDep
) -> FrontierRead:
    job = owned_job(session, owner_id, job_id)
    frontier = read_frontier(job_artifact(settings, job, "frontier.json", what="frontier"))

    def linked(point: FrontierPoint) -> FrontierPointRead:
        href = f"/v1/jobs/{job.id}/plans/{point.plan_id}"
        return FrontierPointRead(**point.model_dump(), href=href)

    return FrontierRead(
        model=frontier.model,
        budget=frontier.budget,
        points=[linked(point) for point in frontier.points],
        uniform=[linked(point) for point in frontier.uniform],
    )


@router.get(
    "/{job_id:job_id}/plans/{plan_id}",
    summary="One plan of the frontier, as JSON or an export",
    responses={
        200: {
            "description": "the plan",
            "content": {media: {} for media in sorted({e.media_type for e in EXPORTS.values()})},
        },
        **problem_responses(401, 404, 409),
    },
)
def get_plan(
    job_id: JobId,
    plan_id: PlanId,
    session: SessionDep,
    settings: SettingsDep,
    owner_id: OwnerDep,
    format: Annotated[
        PlanFormat,  # type: ignore[valid-type]  # a Literal built from the export registry
        Query(description="; ".join(f"{e.name}: {e.description}" for e in EXPORTS.values())),
    ] = "json",
) -> Response:
    job = owned_job(session, owner_id, job_id)
    path = job_artifact(settings, job, f"plans/{plan_id}.json", what=f"plan {plan_id!r}")
    export = EXPORTS[format]
    if export.render is None:  # the plan file itself
        return FileResponse(path, media_type=export.media_type)
    text = export.render(read_plan(path))
    return PlainTextResponse(text, media_type=export.media_type)


class _CSVFile(FileResponse):
    media_type = "text/csv"


class _HTMLFile(FileResponse):
    media_type = "text/html"


@router.get(
    "/{job_id:job_id}/sensitivity",
    summary="The sensitivity table (CSV)",
    response_class=_CSVFile,
    responses=problem_responses(401, 404, 409),
)
def get_sensitivity(
    job_id: JobId, session: SessionDep, settings: SettingsDep, owner_id: OwnerDep
) -> _CSVFile:
    job = owned_job(session, owner_id, job_id)
    return _CSVFile(job_artifact(settings, job, "sensitivity.csv", what="sensitivity table"))


@router.get(
    "/{job_id:job_id}/report",
    summary="The HTML report",
    response_class=_HTMLFile,
    responses=problem_responses(401, 404, 409),
)
def get_report(
    job_id: JobId, session: SessionDep, settings: SettingsDep, owner_id: OwnerDep
) -> _HTMLFile:
    job = owned_job(session, owner_id, job_id)
    # The report is written after the job's other results, so its absence means "not yet".
    return _HTMLFile(job_artifact(settings, job, "report.html", what="report", missing_status=409))
