"""Operator commands, on this machine's settings (``BITPLAN_*``): ``db upgrade``, ``keys
create NAME``, ``serve`` (migrations, worker processes, the API) and ``worker``.

``db`` and ``keys`` are Typer sub-apps; ``serve`` and ``worker`` are plain commands. The
database, the web server and the worker are imported inside the commands.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from bitplan.app.console import err_console, run_command
from bitplan.app.settings import Settings, get_settings
from bitplan.sensitivity.errors import InputError

__all__ = ["db_app", "keys_app", "serve", "worker"]

db_app = typer.Typer(help="The service database.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
_DEFAULTS = {name: field.default for name, field in Settings.model_fields.items()}


def _setting(name: str, help: str, *, low: int | None = None, high: int | None = None) -> Any:
    """A serve option for the setting ``name``: its default and environment variable are the
    settings' own, so ``--help`` shows both and an option given on the command line wins."""
    return typer.Option(
        help=help,
        envvar=f"{Settings.model_config['env_prefix']}{name.upper()}",
        show_envvar=True,
        min=low,
        max=high,
    )


def _safe_url(url: str) -> str:
    """A database URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the database migrations (BITPLAN_DATABASE_URL) up to the newest."""
    from bitplan.app.db import upgrade_database

    url = get_settings().database_url
    upgrade_database(url)
    err_console.print(f"database schema is up to date ({_safe_url(url)})")


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Argument(help="Who the key is for.")]) -> None:
    """Create an API key and print it once; only its hash is stored."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from bitplan.app import crud
    from bitplan.app.db import make_engine, make_sessionmaker

    def create() -> str:
        url = get_settings().database_url
        engine = make_engine(url)
        try:
            with make_sessionmaker(engine)() as session:
                return crud.create_api_key(session, name=name)[1]
        except (OperationalError, ProgrammingError):
            raise InputError(
                f"the database {_safe_url(url)} has no bitplan tables; run "
                "`bitplan db upgrade` first"
            ) from None
        finally:
            engine.dispose()

    plaintext = run_command(create)
    typer.echo(plaintext)
    err_console.print(f"created API key {name!r}; store it now, it is not shown again")


def serve(
    host: Annotated[str, _setting("host", "Interface to listen on.")] = _DEFAULTS["host"],
    port: Annotated[int, _setting("port", "TCP port.", low=0, high=65535)] = _DEFAULTS["port"],
    workers: Annotated[int, _setting("workers", "Worker processes.", low=0)] = _DEFAULTS["workers"],
) -> None:
    """Run the REST API with worker processes (migrates the database first)."""
    import uvicorn

    from bitplan.app.db import upgrade_database
    from bitplan.app.embedded import exit_on_sigterm, stop_workers
    from bitplan.app.main import create_app
    from bitplan.app.worker import spawn_workers

    settings = get_settings().model_copy(update={"host": host, "port": port, "workers": workers})

    def prepare() -> Any:
        upgrade_database(settings.database_url)
        return create_app(settings)  # refuses an open server before anything starts

    api = run_command(prepare)
    processes = spawn_workers(settings, count=settings.workers)
    err_console.print(
        f"bitplan API on http://{settings.host}:{settings.port} with "
        f"{settings.workers} worker(s); Ctrl-C stops everything"
    )
    exit_on_sigterm()
    try:
        uvicorn.run(api, host=settings.host, port=settings.port)
    finally:
        stop_workers(processes)


def worker(
    once: Annotated[bool, typer.Option(help="Exit when the queue is empty.")] = False,
) -> None:
    """Run one worker: claim queued jobs and run them (SIGTERM releases the current one)."""
    from bitplan.app.worker import run_worker

    ran = run_worker(get_settings(), once=once)
    err_console.print(f"worker stopped after {ran} job(s)")
