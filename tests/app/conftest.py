"""Database fixtures for the service tests: a migrated SQLite file per test, and a throwaway
PostgreSQL database per test on the server at 127.0.0.1:5432 (several test runs may share it,
so each test creates a database with a random name and drops it afterwards).

Fixtures:
- ``sqlite_url`` / ``postgres_url``: migrated databases (``alembic upgrade head``).
- ``db_url``: the same test once on SQLite and once on PostgreSQL (marked ``postgres``).
- ``empty_db_url``: like ``db_url`` but not migrated (for the migration tests).
- ``engine``: an engine on ``db_url``, disposed afterwards.
- ``settings``: Settings on ``sqlite_url`` with a private data folder, auth off, small limits.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from bitplan.app.db import make_engine, upgrade_database
from bitplan.app.settings import Settings

POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db' / 'bitplan.db'}"


@pytest.fixture
def postgres_empty_url() -> Iterator[str]:
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
