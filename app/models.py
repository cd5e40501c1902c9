"""SQLAlchemy ORM models of the service: API keys, uploaded blobs, jobs.

These are storage classes only; the HTTP schemas (pydantic) live in ``app/schemas.py``. The
schema is created and changed by Alembic (``migrations/versions``), never by ``create_all``;
``tests/app/test_migrations.py`` runs ``alembic check`` so the two cannot drift apart.

Timestamps are timezone-aware UTC in Python. SQLite has no time zone type, so
:class:`UTCDateTime` stores naive UTC there and hands back aware values everywhere.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# TERMINAL_STATES is re-exported for modules that still import it from here.
from bitplan.app.states import TERMINAL_STATES, JobKind, JobState

__all__ = [
    "BLOB_KINDS",
    "TERMINAL_STATES",
    "ApiKey",
    "Base",
    "Blob",
    "Job",
    "JobStateType",
    "SearchPeer",
    "SensitivityShard",
    "UTCDateTime",
    "WorkerBeat",
    "new_id",
    "utcnow",
]

BLOB_KINDS = ("model", "dataset")

# Deterministic constraint names, so migrations can name what they create and drop.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def new_id() -> str:
    """A fresh random identifier (uuid4, 36 characters)."""
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python; ``timestamptz`` on PostgreSQL, naive UTC on SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JobStateType(TypeDecorator[JobState]):
    """A :class:`JobState` in Python, its plain string value (``'queued'``, ...) in the column."""

    impl = String(16)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else JobState(value).value  # refuses unknown states

    def process_result_value(self, value: str | None, dialect: Dialect) -> JobState | None:
        return None if value is None else JobState(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class ApiKey(Base):
    """An API key; only a hash of the secret is stored (the plaintext is shown once)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Blob(Base):
    """An uploaded model or dataset file, content-addressed by sha256 within its owner."""

    __tablename__ = "blobs"
    __table_args__ = (
        UniqueConstraint("owner_id", "kind", "sha256"),
        CheckConstraint("kind IN ('model', 'dataset')", name="kind"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(16))
    owner_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    sha256: Mapped[str] = mapped_column(String(64))
    filename: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


def _one_of(column: str, values: type[JobState] | type[JobKind]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class Job(Base):
    """One unit of queued work and its queue bookkeeping (lease, attempts, cancel flag).

    ``kind`` says what: a user's planning job (``search``), or the export of one of a succeeded
    job's plans for a runtime (``export``: ``parent_id``, ``plan_id`` and ``target`` name it, at
    most one row each, so repeated requests share one export). Both kinds go through the same
    claim, lease, heartbeat, fencing, reaper, staging folder and sweep (app/queue.py,
    app/worker.py, app/sweeper.py); only the work differs. Exports are never listed as jobs.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key"),
        UniqueConstraint("parent_id", "plan_id", "target"),
        Index(None, "state", "created_at"),
        Index(None, "owner_id", "created_at"),
        CheckConstraint(_one_of("state", JobState), name="state"),
        CheckConstraint(_one_of("kind", JobKind), name="kind"),
        # An export names its job, plan and target; a search job none of them.
        CheckConstraint(
            "(kind = 'search' AND parent_id IS NULL AND plan_id IS NULL AND target IS NULL) OR "
            "(kind = 'export' AND parent_id IS NOT NULL AND plan_id IS NOT NULL "
            "AND target IS NOT NULL)",
            name="export_fields",
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(
        String(16), default=JobKind.SEARCH.value, server_default=JobKind.SEARCH.value
    )
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    plan_id: Mapped[str | None] = mapped_column(String(128))  # PLAN_ID_PATTERN's longest
    target: Mapped[str | None] = mapped_column(String(32))  # a name of search/targets.py
    state: Mapped[JobState] = mapped_column(JobStateType(), default=JobState.QUEUED)
    stage: Mapped[str] = mapped_column(String(64), default=JobState.QUEUED.value)
    # Overall fraction done and ETA of the whole attempt (see app/job_progress.py) ...
    progress: Mapped[float] = mapped_column(default=0.0)
    eta_s: Mapped[float | None]
    # ... and of the current stage alone (each stage restarts at 0).
    stage_progress: Mapped[float] = mapped_column(default=0.0, server_default=text("0"))
    stage_eta_s: Mapped[float | None]
    spec: Mapped[dict[str, Any]]
    model_id: Mapped[str | None] = mapped_column(ForeignKey("blobs.id", ondelete="SET NULL"))
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("blobs.id", ondelete="SET NULL"))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]
    lease_version: Mapped[int] = mapped_column(default=0)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WorkerBeat(Base):
    """A running worker's presence: the worker rewrites ``last_seen_at`` every few seconds, so
    the API can count the workers able to run jobs, embedded in ``serve`` or on other machines
    alike (app/worker_presence.py). A worker that stops cleanly deletes its row; a killed one
    simply goes stale."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # the worker id of its leases
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class SearchPeer(Base):
    """A place for another worker in a running job's measured search (app/search_peers.py).

    The job's own worker opens ``search_peers`` places when its job reaches the search stage and
    deletes them when it leaves; an idle worker claims one (``worker_id``, a lease it renews)
    and runs trials of the job's Optuna study. ``job_lease_version`` ties a place to the attempt
    that opened it: once that attempt's lease is gone, nobody can claim or renew it.
    """

    __tablename__ = "search_peers"
    __table_args__ = (UniqueConstraint("job_id", "slot"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    slot: Mapped[int]  # 1.. the job's number of places; the joining worker's seed offset
    job_lease_version: Mapped[int]
    worker_id: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]


class SensitivityShard(Base):
    """A part of a running job's sensitivity table that any worker may compute
    (app/sensitivity_shards.py).

    The job's worker splits its planned layers into shards (whole tie and share groups) when its
    job reaches the analyze stage, and deletes them once it has merged their tables; a worker
    claims one (``worker_id``, a lease it renews), writes the table of its ``layers`` into the
    job's staging folder and sets ``done``. ``job_lease_version`` ties a shard to the attempt
    that opened it. ``failures`` counts other workers that could not compute it: such a shard is
    left to the job's own worker.
    """

    __tablename__ = "sensitivity_shards"
    __table_args__ = (UniqueConstraint("job_id", "shard"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    shard: Mapped[int]  # 0.. the job's number of shards; names the shard's table file
    job_lease_version: Mapped[int]
    layers: Mapped[list[str]] = mapped_column(JSON)  # planned layer names, in model order
    worker_id: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]
    done: Mapped[bool] = mapped_column(default=False)
    failures: Mapped[int] = mapped_column(default=0)
