"""Alembic environment of the bitplan service.

The URL comes from, in order: a connection handed over in ``config.attributes["connection"]``
(``bitplan.app.db.upgrade_database``, the tests), ``sqlalchemy.url`` in the config, or the service
settings (``BITPLAN_DATABASE_URL``). The version table is ``bitplan_alembic_version`` and only
the app's own tables are compared, so Optuna's RDB storage (which keeps its own
``alembic_version`` table) can never collide with or confuse these migrations.
"""

from __future__ import annotations

import logging.config
from typing import Any

from alembic import context
from sqlalchemy import Connection

from bitplan.app.db import make_engine
from bitplan.app.models import Base

VERSION_TABLE = "bitplan_alembic_version"

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Compare only our tables: a shared PostgreSQL database may hold Optuna's as well."""
    if type_ == "table" and reflected and compare_to is None:
        return name in target_metadata.tables
    return True


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from bitplan.app.settings import get_settings

    return get_settings().database_url


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_object=_include_object,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTER needs batch mode
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            _configure(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
