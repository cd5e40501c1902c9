"""Database engines, sessions and migrations.

SQLite (the embedded default) gets WAL (readers never block the writer), a busy timeout
(writers queue instead of failing) and foreign keys. Its driver's own transaction handling is
switched off so that SQLAlchemy emits ``BEGIN`` itself: a connection opened with
``execution_options(sqlite_immediate=True)`` begins with ``BEGIN IMMEDIATE``, taking the write
lock up front; the job queue relies on that, because SQLAlchemy silently drops ``FOR UPDATE``
on SQLite (see the SQLAlchemy pysqlite notes on "Serializable isolation / Savepoints").

The schema is owned by Alembic (``migrations/``); the app never calls ``create_all``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

import bitplan.migrations

__all__ = ["alembic_config", "make_engine", "make_sessionmaker", "upgrade_database"]

logger = logging.getLogger(__name__)

# Milliseconds a SQLite writer waits for the lock before "database is locked": long enough for
# a job-progress write to wait out a concurrent claim or upload commit.
_SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; for a SQLite file, creates its folder and tunes the connection."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, **kwargs)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False}, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves, below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get("sqlite_immediate", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


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
