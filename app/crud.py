"""Keyword-only create/read/update/delete functions over the ORM models, used by the API.

Every function takes the request's ``Session`` and the caller's ``owner_id`` (the API key's id,
or ``None`` when keys are off) and never returns another owner's rows: the API answers 404 for
them. Functions that write commit. Lists are newest first with an opaque cursor
(``created_at`` + ``id``), so pages stay stable while new rows arrive.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
from collections.abc import Collection
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, and_, exists, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session

from bitplan.app.models import BLOB_KINDS, ApiKey, Blob, Job, utcnow
from bitplan.app.states import JobKind, JobState
from bitplan.sensitivity.errors import InputError

__all__ = [
    "BlobInUse",
    "ConflictError",
    "IdempotencyMismatch",
    "blob_path_in_use",
    "blob_paths",
    "create_api_key",
    "create_job",
    "create_or_get_blob",
    "delete_blob",
    "delete_blob_if_idle",
    "find_api_key",
    "get_blob",
    "get_job",
    "hash_api_key",
    "list_api_keys",
    "list_blobs",
    "jobs_keeping_results",
    "list_jobs",
    "request_cancel",
    "revoke_api_key",
    "running_lease_versions",
]

# Bytes of randomness in an API key: 32 bytes = 256 bits, so a plain sha256 of the key is a safe
# stored hash (no password-style stretching needed for keys nobody chose by hand).
_KEY_BYTES = 32
_KEY_PREFIX = "bp_"
MAX_PAGE = 200  # largest page a list call returns; bounds one request's work

_Row = TypeVar("_Row", Job, Blob)


class ConflictError(Exception):
    """The request conflicts with the resource's current state (HTTP 409)."""


class BlobInUse(ConflictError):
    """A model or dataset that a queued or running job still needs cannot be deleted."""


class IdempotencyMismatch(InputError):
    """An Idempotency-Key was reused with a different request body (HTTP 422)."""


# The rows a user's job routes see: planning jobs, not the exports queued beside them.
_IS_SEARCH = Job.kind == JobKind.SEARCH.value


def _owned(column: InstrumentedAttribute[str | None], owner_id: str | None) -> ColumnElement[bool]:
    return column.is_(None) if owner_id is None else column == owner_id


# --- API keys ----------------------------------------------------------------------------------


def hash_api_key(plaintext: str) -> str:
    """The stored form of a key (sha256 hex)."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def create_api_key(session: Session, *, name: str) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the plaintext, which is never stored or shown again."""
    if not name.strip():
        raise InputError("an API key needs a non-empty name")
    plaintext = _KEY_PREFIX + secrets.token_urlsafe(_KEY_BYTES)
    key = ApiKey(name=name.strip(), key_hash=hash_api_key(plaintext))
    session.add(key)
    session.commit()
    return key, plaintext


def find_api_key(session: Session, *, plaintext: str) -> ApiKey | None:
    """The active (not revoked) key with this plaintext, if any."""
    return session.scalar(
        select(ApiKey).where(
            ApiKey.key_hash == hash_api_key(plaintext), ApiKey.revoked_at.is_(None)
        )
    )


def list_api_keys(session: Session) -> list[ApiKey]:
    """Every key, revoked ones included, oldest first (for ``bitplan keys list``)."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)))


def revoke_api_key(session: Session, *, ref: str) -> tuple[ApiKey, bool]:
    """Revoke the key whose id or name is ``ref``; returns it and whether this call revoked it
    (False: it was revoked already). A name shared by several active keys is refused: an
    operator revoking by name must not cut off more clients than they meant to."""
    matches = list(session.scalars(select(ApiKey).where(ApiKey.id == ref)))
    if not matches:
        matches = list(session.scalars(select(ApiKey).where(ApiKey.name == ref.strip())))
    if not matches:
        raise InputError(f"no API key has the id or name {ref!r}; see `bitplan keys list`")
    active = [key for key in matches if key.revoked_at is None]
    if len(active) > 1:
        ids = ", ".join(key.id for key in active)
        raise InputError(f"{len(active)} active API keys are named {ref!r} ({ids}); revoke by id")
    if not active:
        return matches[0], False
    active[0].revoked_at = utcnow()
    session.commit()
    return active[0], True


# --- pagination --------------------------------------------------------------------------------


def _encode_cursor(row: Job | Blob) -> str:
    raw = json.dumps([row.created_at.isoformat(), row.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, row_id = json.loads(raw)
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:
            raise ValueError("cursor time without a time zone")
        return when, str(row_id)
    except (binascii.Error, ValueError, TypeError) as error:
        raise InputError(
            f"invalid cursor {cursor!r}; pass the next_cursor value of a previous page"
        ) from error


def _page(
    session: Session,
    model: type[_Row],
    conditions: list[ColumnElement[bool]],
    *,
    limit: int,
    cursor: str | None,
) -> tuple[list[_Row], str | None]:
    """One page, newest first, plus the cursor of the next page (None on the last page)."""
    if not 1 <= limit <= MAX_PAGE:
        raise InputError(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
    if cursor is not None:
        created, row_id = _decode_cursor(cursor)
        conditions = [
            *conditions,
            or_(model.created_at < created, and_(model.created_at == created, model.id < row_id)),
        ]
    rows = list(
        session.scalars(
            select(model)
            .where(*conditions)
            .order_by(model.created_at.desc(), model.id.desc())
            .limit(limit + 1)
        )
    )
    if len(rows) <= limit:
        return rows, None
    return rows[:limit], _encode_cursor(rows[limit - 1])


# --- jobs --------------------------------------------------------------------------------------


def create_job(
    session: Session,
    *,
    owner_id: str | None,
    spec: dict[str, Any],
    model_id: str | None,
    dataset_id: str | None,
    idempotency_key: str | None,
    request_hash: str | None,
    max_attempts: int,
) -> Job:
    """Queue a job. With an ``idempotency_key`` already used by this owner, returns that job
    when ``request_hash`` matches and raises :class:`IdempotencyMismatch` when it does not."""
    if idempotency_key is not None:
        previous = _job_by_key(session, owner_id=owner_id, key=idempotency_key)
        if previous is not None:
            return _replay(previous, request_hash)
    job = Job(
        owner_id=owner_id,
        spec=spec,
        model_id=model_id,
        dataset_id=dataset_id,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        max_attempts=max_attempts,
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:  # a concurrent request with the same key won the insert
        session.rollback()
        previous = _job_by_key(session, owner_id=owner_id, key=idempotency_key)
        if previous is None:
            raise
        return _replay(previous, request_hash)
    return job


def _job_by_key(session: Session, *, owner_id: str | None, key: str | None) -> Job | None:
    if key is None:
        return None
    return session.scalar(
        select(Job).where(_owned(Job.owner_id, owner_id), Job.idempotency_key == key)
    )


def _replay(job: Job, request_hash: str | None) -> Job:
    if job.request_hash != request_hash:
        raise IdempotencyMismatch(
            "this Idempotency-Key was already used with a different request body; "
            "reuse a key only to retry the identical request"
        )
    return job


def get_job(session: Session, *, job_id: str, owner_id: str | None) -> Job | None:
    """The owner's planning job ``job_id``; None for another owner's or an export's id (exports
    are reached through their job: :mod:`bitplan.app.model_exports`)."""
    return session.scalar(
        select(Job).where(Job.id == job_id, _owned(Job.owner_id, owner_id), _IS_SEARCH)
    )


def list_jobs(
    session: Session,
    *,
    owner_id: str | None,
    state: JobState | str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Job], str | None]:
    """The owner's jobs, newest first, optionally in one ``state``; returns (page, next_cursor)."""
    conditions = [_owned(Job.owner_id, owner_id), _IS_SEARCH]
    if state is not None:
        if state not in set(JobState):
            accepted = ", ".join(JobState)
            raise InputError(f"unknown job state {state!r}; accepted: {accepted}")
        conditions.append(Job.state == JobState(state))
    return _page(session, Job, conditions, limit=limit, cursor=cursor)


def request_cancel(session: Session, *, job_id: str, owner_id: str | None) -> Job | None:
    """Cancel a job: a queued one is cancelled at once; a running one gets the cancel flag,
    which its worker honours between layers and trials. Finished jobs are left unchanged."""
    job = get_job(session, job_id=job_id, owner_id=owner_id)
    if job is None:
        return None
    now = utcnow()
    # Two conditional statements, each atomic against a worker's claim: whichever state the
    # job is in when a statement runs decides what it does.
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.QUEUED)
        .values(
            state=JobState.CANCELLED,
            stage=JobState.CANCELLED.value,
            cancel_requested=True,
            finished_at=now,
        )
    )
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING)
        .values(cancel_requested=True)
    )
    session.commit()
    session.refresh(job)
    return job


# --- blobs -------------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in BLOB_KINDS:
        raise InputError(f"unknown resource kind {kind!r}; accepted: {', '.join(BLOB_KINDS)}")


def create_or_get_blob(
    session: Session,
    *,
    owner_id: str | None,
    kind: str,
    sha256: str,
    filename: str,
    size_bytes: int,
    path: str,
) -> tuple[Blob, bool]:
    """Record an upload; the same bytes uploaded again by the same owner return the existing
    row. Returns (blob, created)."""
    _check_kind(kind)
    query = select(Blob).where(
        _owned(Blob.owner_id, owner_id), Blob.kind == kind, Blob.sha256 == sha256
    )
    existing = session.scalar(query)
    if existing is not None:
        return existing, False
    blob = Blob(
        owner_id=owner_id,
        kind=kind,
        sha256=sha256,
        filename=filename,
        size_bytes=size_bytes,
        path=path,
    )
    session.add(blob)
    try:
        session.commit()
    except IntegrityError:  # the same bytes finished uploading concurrently
        session.rollback()
        existing = session.scalar(query)
        if existing is None:
            raise
        return existing, False
    return blob, True


def get_blob(
    session: Session, *, blob_id: str, owner_id: str | None, kind: str | None = None
) -> Blob | None:
    conditions = [Blob.id == blob_id, _owned(Blob.owner_id, owner_id)]
    if kind is not None:
        _check_kind(kind)
        conditions.append(Blob.kind == kind)
    return session.scalar(select(Blob).where(*conditions))


def list_blobs(
    session: Session,
    *,
    owner_id: str | None,
    kind: str,
    sha256: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Blob], str | None]:
    """The owner's models or datasets, newest first, optionally only those whose bytes have
    this ``sha256`` (hex, either case); returns (page, next_cursor)."""
    _check_kind(kind)
    conditions = [_owned(Blob.owner_id, owner_id), Blob.kind == kind]
    if sha256 is not None:
        # Stored digests are hashlib's lowercase hexdigest.
        conditions.append(Blob.sha256 == sha256.lower())
    return _page(session, Blob, conditions, limit=limit, cursor=cursor)


def delete_blob(
    session: Session, *, blob_id: str, owner_id: str | None, kind: str | None = None
) -> Blob | None:
    """Delete the row (None when not found). Raises :class:`BlobInUse` while a queued or
    running job needs it. The caller removes the file when :func:`blob_path_in_use` is False."""
    blob = get_blob(session, blob_id=blob_id, owner_id=owner_id, kind=kind)
    if blob is None:
        return None
    active = session.scalar(
        select(
            exists().where(
                or_(Job.model_id == blob_id, Job.dataset_id == blob_id),
                Job.state.in_((JobState.QUEUED, JobState.RUNNING)),
            )
        )
    )
    if active:
        raise BlobInUse(
            f"{blob.kind} {blob_id} is used by a queued or running job; cancel the job first"
        )
    session.delete(blob)
    session.commit()
    return blob


def blob_path_in_use(session: Session, *, path: str) -> bool:
    """Whether any blob row (of any owner) still points at the stored file ``path``."""
    return bool(session.scalar(select(exists().where(Blob.path == path))))


# --- the orphan sweep (bitplan.app.sweeper): questions across owners -------------------------

# Ids per IN (...) list: far under SQLite's and PostgreSQL's limits on bound parameters.
_IDS_PER_QUERY = 500


def _chunks(ids: Collection[str]) -> list[list[str]]:
    ordered = sorted(ids)
    return [ordered[i : i + _IDS_PER_QUERY] for i in range(0, len(ordered), _IDS_PER_QUERY)]


def running_lease_versions(session: Session, *, job_ids: Collection[str]) -> dict[str, int]:
    """The current lease version of each of these jobs (any owner) that is running: a staging
    folder of any other version (or of a job not running) belongs to an attempt that is over."""
    versions: dict[str, int] = {}
    for chunk in _chunks(job_ids):
        rows = session.execute(
            select(Job.id, Job.lease_version).where(
                Job.id.in_(chunk), Job.state == JobState.RUNNING
            )
        )
        versions.update({row.id: row.lease_version for row in rows})
    return versions


def jobs_keeping_results(session: Session, *, job_ids: Collection[str]) -> set[str]:
    """Those of these jobs (any owner) whose artifact folder may be served or replaced by a
    later attempt: every job that exists and neither failed nor was cancelled."""
    ended_without_results = (JobState.FAILED, JobState.CANCELLED)
    kept: set[str] = set()
    for chunk in _chunks(job_ids):
        kept.update(
            session.scalars(
                select(Job.id).where(Job.id.in_(chunk), Job.state.not_in(ended_without_results))
            )
        )
    return kept


def blob_paths(session: Session) -> list[tuple[str, str]]:
    """``(id, stored path)`` of every model and dataset row, of every owner."""
    return [(row.id, row.path) for row in session.execute(select(Blob.id, Blob.path))]


def delete_blob_if_idle(session: Session, *, blob_id: str) -> bool:
    """Delete a row (any owner) unless a queued or running job needs it; True when deleted.
    Finished jobs keep their own copy of the request, so they show the resource as deleted."""
    blob = session.get(Blob, blob_id)
    if blob is None:
        return False
    try:
        return delete_blob(session, blob_id=blob_id, owner_id=blob.owner_id) is not None
    except BlobInUse:
        return False
