"""Database fixtures for the service tests: a migrated SQLite file per test, and a throwaway
PostgreSQL database per test on the server at 127.0.0.1:5432 (several test runs may share it,
so each test creates a database with a random name and drops it afterwards).

When no server answers there, PostgreSQL tests skip and say why (``pytest -ra`` lists the
reason) — except under ``CI=true``, where a missing server is an error: CI must never pass
by skipping the queue's real-database tests.

Fixtures:
- ``sqlite_url`` / ``postgres_url``: migrated databases (``alembic upgrade head``).
- ``db_url``: the same test once on SQLite and once on PostgreSQL (marked ``postgres``).
- ``empty_db_url``: like ``db_url`` but not migrated (for the migration tests).
- ``engine``: an engine on ``db_url``, disposed afterwards.
- ``settings``: Settings on ``sqlite_url`` with a private data folder, auth off, small limits.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NoReturn

import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.exc import OperationalError

from bitplan.app.db import make_engine, upgrade_database
from bitplan.app.settings import Settings

POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
# Seconds the reachability probe waits for the server: a local server answers in milliseconds.
_PROBE_TIMEOUT_S = 5


def in_ci(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` is a CI run (``CI=true``, as GitHub, GitLab and most CIs set it)."""
    return environ.get("CI", "").strip().lower() in ("true", "1")


def postgres_unreachable(reason: str, *, environ: Mapping[str, str]) -> NoReturn:
    """Skip the test, saying why; under ``CI=true`` fail it instead (a skip would pass CI)."""
    server = make_url(POSTGRES_ADMIN_URL)
    message = f"PostgreSQL at {server.host}:{server.port} is not reachable: {reason}"
    if in_ci(environ):
        pytest.fail(f"{message} (CI=true: the PostgreSQL tests must run)", pytrace=False)
    pytest.skip(f"{message} (start one, e.g. the postgres service of docker/compose.yaml)")


@pytest.fixture(scope="session")
def postgres_server() -> None:
    """Probe the server once a session; its skip or failure repeats for every test using it."""
    admin = create_engine(POSTGRES_ADMIN_URL, connect_args={"connect_timeout": _PROBE_TIMEOUT_S})
    try:
        with admin.connect():
            pass
    except OperationalError as exc:
        first_line = str(exc.orig).strip().partition("\n")[0]
        postgres_unreachable(first_line or type(exc.orig).__name__, environ=os.environ)
    finally:
        admin.dispose()


def _sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db' / 'bitplan.db'}"


@pytest.fixture
def postgres_empty_url(postgres_server: None) -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped (even with open connections) afterwards."""
    name = f"bitplan_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture
def postgres_url(postgres_empty_url: str) -> str:
    upgrade_database(postgres_empty_url)
    return postgres_empty_url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = _sqlite_url(tmp_path)
    upgrade_database(url)
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return _sqlite_url(tmp_path)
    return request.getfixturevalue("postgres_empty_url")


@pytest.fixture
def db_url(empty_db_url: str) -> str:
    upgrade_database(empty_db_url)
    return empty_db_url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def settings(tmp_path: Path, sqlite_url: str) -> Settings:
    """Service settings on a migrated SQLite database; leases short enough for fast tests."""
    return Settings(
        database_url=sqlite_url,
        data_dir=tmp_path / "data",
        auth="off",
        max_upload_bytes=1024 * 1024,  # 1 MiB: upload-limit tests need only a little data
        lease_seconds=2.0,
        heartbeat_seconds=0.5,
        poll_seconds=0.1,
        max_attempts=3,
        workers=0,
    )
