"""Database engines, sessions and migrations.

SQLite (the embedded default) gets WAL (readers never block the writer), a busy timeout
(writers queue instead of failing) and foreign keys. Its driver's own transaction handling is
switched off so that SQLAlchemy emits ``BEGIN`` itself: a connection opened with
``execution_options(sqlite_immediate=True)`` begins with ``BEGIN IMMEDIATE``, taking the write
lock up front; the job queue relies on that, because SQLAlchemy silently drops ``FOR UPDATE``
on SQLite (see the SQLAlchemy pysqlite notes on "Serializable isolation / Savepoints").

Under load the database says "not now" rather than "no": the pool has no free connection in
time, SQLite's write lock stays taken past the busy timeout, a PostgreSQL connection drops.
:func:`is_transient` names those errors once; the API answers them with 503 + ``Retry-After``
and the worker retries them with :class:`Backoff` (capped exponential with jitter, as in the AWS
Architecture Blog's "Exponential Backoff And Jitter") through :func:`retry_transient`.

The schema is owned by Alembic (``migrations/``); the app never calls ``create_all``.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

import bitplan.migrations
from bitplan.app.settings import Settings

__all__ = [
    "Backoff",
    "alembic_config",
    "engine_for",
    "is_transient",
    "make_engine",
    "make_sessionmaker",
    "retry_transient",
    "upgrade_database",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_DEFAULT_BUSY_TIMEOUT_S: float = Settings.model_fields["sqlite_busy_timeout_s"].default


def make_engine(
    url: str, *, sqlite_busy_timeout_s: float = _DEFAULT_BUSY_TIMEOUT_S, **kwargs: Any
) -> Engine:
    """An engine for ``url``; for a SQLite file, creates its folder and tunes the connection.
    ``kwargs`` go to :func:`sqlalchemy.create_engine` (pool sizes: see :func:`engine_for`)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, **kwargs)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False}, **kwargs)
    busy_timeout_ms = round(sqlite_busy_timeout_s * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves, below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get("sqlite_immediate", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def engine_for(settings: Settings) -> Engine:
    """The engine of one service process (API or worker), its pool sized by ``settings``."""
    url = make_url(settings.database_url)
    pooled = not (url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"))
    # An in-memory SQLite database lives in one connection: its pool takes no size.
    pool = (
        {
            "pool_size": settings.db_pool_size,
            "max_overflow": settings.db_max_overflow,
            "pool_timeout": settings.db_pool_timeout_s,
        }
        if pooled
        else {}
    )
    return make_engine(
        settings.database_url, sqlite_busy_timeout_s=settings.sqlite_busy_timeout_s, **pool
    )


# What SQLite says when another connection holds the lock ("database is locked", "database
# table is locked", SQLITE_BUSY's "database is busy").
_SQLITE_BUSY_WORDS = ("locked", "busy")


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` is the database saying "not now": no pooled connection free in time,
    a dropped connection, or an ``OperationalError`` (the DB-API's class for failures of the
    database's operation rather than of the statement: locked, busy, out of connections, shut
    down). Retrying one that persists costs a log line per backoff, never a dead worker."""
    if isinstance(error, exc.TimeoutError | exc.DisconnectionError):
        return True
    if isinstance(error, exc.OperationalError):
        if isinstance(error.orig, sqlite3.OperationalError):
            # SQLite raises this class for "no such table" and syntax errors too: permanent
            # faults that must stay 500s, not pass for a busy database forever.
            return any(word in str(error.orig) for word in _SQLITE_BUSY_WORDS)
        return True
    return isinstance(error, exc.DBAPIError) and error.connection_invalidated


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter: the n-th retry waits between half and all of
    ``min(cap_s, base_s * 2**n)``, so retries spread out instead of colliding again."""

    base_s: float = 0.1
    cap_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.base_s <= self.cap_s:
            raise ValueError(f"Backoff needs 0 < base_s <= cap_s, got {self.base_s}, {self.cap_s}")

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failures (0 for the first retry)."""
        # 2**30 base steps exceed any cap; the exponent is clamped so it never overflows.
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(max(failures, 0), 30))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def retry_transient(
    call: Callable[[], T],
    *,
    what: str,
    attempts: int,
    backoff: Backoff | None = None,
    sleep: Callable[[float], Any] = time.sleep,
) -> T:
    """``call()``, retried up to ``attempts`` times in all while it raises a transient database
    error (:func:`is_transient`); each retry is logged. The last error propagates, as does any
    other error at once. ``what`` names the operation in the log."""
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    backoff = backoff or Backoff()
    failures = 0
    while True:
        try:
            return call()
        except Exception as error:
            failures += 1
            if not is_transient(error) or failures >= attempts:
                raise
            wait = backoff.delay(failures - 1)
            logger.warning(
                "%s failed (%s: %s); retry %d of %d in %.2f s",
                what,
                type(error).__name__,
                str(error).partition("\n")[0],
                failures,
                attempts - 1,
                wait,
            )
            sleep(wait)


def make_sessionmaker(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (the API serialises them afterwards).

    On SQLite every session transaction begins IMMEDIATE: a request reads (auth, a lookup) and
    then writes, and in WAL mode a deferred reader that tries to write after a worker committed
    fails at once with "database is locked" instead of waiting. Taking the lock first makes it
    wait its turn (``busy_timeout``); requests are short, so the cost is small.

    ``read_only`` sessions (GET requests: job polling) begin deferred instead, so a hundred
    pollers never queue for the write lock that the worker's heartbeats and progress need.
    """
    if engine.dialect.name == "sqlite" and not read_only:
        engine = engine.execution_options(sqlite_immediate=True)
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """The project's Alembic configuration pointed at ``url``."""
    migrations = Path(bitplan.migrations.__file__).resolve().parent  # package data, installed
    config = Config(str(migrations / "alembic.ini"))
    config.set_main_option("script_location", str(migrations))
    # ConfigParser interpolation would eat a "%" in a password; escape it.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False  # keep the host application's logging
    return config


def upgrade_database(url: str, revision: str = "head") -> None:
    """Apply the migrations up to ``revision`` (``alembic upgrade head``)."""
    logger.info("upgrading database schema to %s", revision)
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            config = alembic_config(url)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()
