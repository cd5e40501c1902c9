"""Service settings, read from ``BITPLAN_*`` environment variables (pydantic-settings).

Everything lives under one data folder by default (``./.bitplan``): the SQLite database of the
embedded mode, uploads, job artifacts, the sensitivity cache and Optuna's own SQLite file.
Optuna's RDB storage is never the app database: it runs its own Alembic migrations with its
own ``alembic_version`` table, so it gets a separate file (or a separate PostgreSQL database).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bitplan.app.endpoint import DEFAULT_HOST, DEFAULT_PORT

__all__ = ["Settings", "get_settings"]

_GIB = 1024**3


class Settings(BaseSettings):
    """Service configuration. Tests build one explicitly; the server uses :func:`get_settings`."""

    model_config = SettingsConfigDict(env_prefix="BITPLAN_", extra="ignore")

    database_url: str = "sqlite:///./.bitplan/bitplan.db"
    data_dir: Path = Path(".bitplan")
    artifact_dir: Path = Field(default_factory=lambda data: data["data_dir"] / "artifacts")
    upload_dir: Path = Field(default_factory=lambda data: data["data_dir"] / "uploads")
    cache_dir: Path = Field(default_factory=lambda data: data["data_dir"] / "cache")
    max_upload_bytes: int = Field(default=2 * _GIB, gt=0)
    workers: int = Field(default=1, ge=0)
    auth: Literal["auto", "on", "off"] = "auto"
    host: str = DEFAULT_HOST
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    lease_seconds: float = Field(default=30.0, gt=0)
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    optuna_storage: str | None = Field(
        default_factory=lambda data: f"sqlite:///{data['data_dir'] / 'optuna.db'}"
    )
    # Optuna's trial heartbeat on that storage: a trial silent for the grace period (its worker
    # died) is failed and its place in the study sampled again (bitplan.search.measured).
    optuna_heartbeat_s: float = Field(default=10.0, gt=0)
    optuna_grace_s: float = Field(default=60.0, gt=0)
    search_peers: int = Field(
        default=0,
        ge=0,
        description="how many idle workers may join one running job's measured search, each "
        "running trials of the job's Optuna study (app/search_peers.py); 0 turns joining off. "
        "Needs an optuna_storage that every worker reaches (PostgreSQL)",
    )
    sensitivity_shards: int = Field(
        default=0,
        ge=0,
        description="how many shards (whole tie and share groups, balanced by size) a job's "
        "sensitivity analysis is split into, for idle workers to compute "
        "(app/sensitivity_shards.py); 0 or 1 analyzes in the job's worker alone. Needs an "
        "artifact_dir that every worker shares (the shards' tables meet there)",
    )
    trusted_models: bool = False
    # "module:function" the worker calls for each job; tests point it at a small double.
    worker_runner: str = "bitplan.search.pipeline:run_job"
    # How often an idle worker looks for work (seconds).
    poll_seconds: float = Field(default=1.0, gt=0)
    # Database connections of one process: SQLAlchemy's pool_size + max_overflow. The API also
    # admits at most this many requests (and half its threadpool) to the database at once; the
    # rest wait their turn (bitplan.app.api.deps), so a burst queues instead of deadlocking.
    # 10 + 10 keeps a few API processes and workers under PostgreSQL's max_connections (100).
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    # How long a request (or a worker) waits for a free connection before it is told to come
    # back later (503 + Retry-After): far above a normal wait, far below a client's timeout.
    db_pool_timeout_s: float = Field(default=10.0, gt=0)
    # How long a SQLite writer waits for the write lock before "database is locked": long enough
    # to wait out a burst of short request transactions and a worker's claim.
    sqlite_busy_timeout_s: float = Field(default=30.0, gt=0)
    # The Retry-After (seconds) of a 503 that says the database is busy: short, because the
    # condition is a queue that drains in milliseconds per request.
    busy_retry_after_s: int = Field(default=2, ge=1)
    # Largest non-upload request body (bytes). A job request is a few hundred bytes; 1 MiB
    # leaves ample room while bounding what one anonymous or hostile request can make us hold.
    max_json_bytes: int = Field(default=1024 * 1024, gt=0)
    # Uploaded models (and large datasets) are checked in a child process (bitplan.app.
    # upload_check) so that a hostile file costs that child, never the API process.
    validate_memory_bytes: int = Field(
        default=3 * _GIB,
        gt=0,
        description="memory (RLIMIT_DATA, bytes) of the child process that checks one upload, "
        "on top of twice the upload's size. A check needs 0.3-0.5 GiB before any weight "
        "(torch, transformers) plus up to the checkpoint's size; 3 GiB leaves room for a model "
        "whose loading converts or copies its weights",
    )
    validate_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="wall-clock limit of one upload's check; the child is killed past it",
    )
    max_validations: int = Field(
        default=2,
        ge=1,
        description="uploads checked in child processes at once; more are told 503 + Retry-After",
    )
    validate_retry_after_s: int = Field(
        default=5,
        ge=1,
        description="the Retry-After (seconds) of that 503: about one small model's check",
    )
    # How often the API sweeps orphans (bitplan.app.sweeper) besides at start-up, in seconds;
    # 0 never. Ten minutes: leftovers are disk space, not errors, and a sweep walks folders.
    sweep_interval_s: float = Field(default=600.0, ge=0)
    # Model exports (GET /v1/jobs/{id}/plans/{plan_id}/model, app/model_exports.py).
    export_runner: str = Field(
        default="bitplan.app.export_run:run_export",
        description="'module:function' a worker calls to write one export; tests point it at "
        "a double",
    )
    export_retry_after_s: int = Field(
        default=2,
        ge=1,
        description="the Retry-After (seconds) of a 202 while an export is queued or running: "
        "a small model's export takes a few seconds",
    )
    export_retry_failed_s: int = Field(
        default=60,
        ge=1,
        description="how long a failed export (a runtime package missing on the worker, a lost "
        "worker, a crash) stands before a GET queues it again; its 503 says when",
    )

    @field_validator("optuna_storage", mode="before")
    @classmethod
    def _empty_storage_is_none(cls, value: object) -> object:
        # An empty BITPLAN_OPTUNA_STORAGE means "no RDB storage" (an in-memory study per job).
        return None if value == "" else value

    @model_validator(mode="after")
    def _optuna_heartbeat_within_grace(self) -> Settings:
        if self.optuna_heartbeat_s >= self.optuna_grace_s:
            raise ValueError(
                f"optuna_heartbeat_s ({self.optuna_heartbeat_s}) must be shorter than "
                f"optuna_grace_s ({self.optuna_grace_s}), or live trials are failed"
            )
        return self

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Settings:
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be shorter than "
                f"lease_seconds ({self.lease_seconds}), or leases expire between heartbeats"
            )
        return self

    @property
    def keys_required(self) -> bool:
        """Whether requests need an API key: always with ``auth=on``, never with ``off``, and
        with ``auto`` whenever the server listens on anything other than loopback."""
        if self.auth != "auto":
            return self.auth == "on"
        return not _is_loopback(self.host)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: assume it is reachable from outside
        return False


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
