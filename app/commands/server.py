"""Operator commands, on this machine's settings (``BITPLAN_*``): ``db upgrade``, ``keys
create NAME|list|revoke ID|NAME``, ``serve`` (migrations, supervised worker processes, the
API) and ``worker``.

``db`` and ``keys`` are Typer sub-apps; ``serve`` and ``worker`` are plain commands. The
database, the web server and the worker are imported inside the commands.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from bitplan.app.console import err_console, run_command
from bitplan.app.settings import Settings, get_settings
from bitplan.sensitivity.errors import InputError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["db_app", "keys_app", "serve", "worker"]

T = TypeVar("T")

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


def _with_keys(action: Callable[[Session], T]) -> T:
    """Run ``action`` on a session of this machine's database, as a CLI command: a database
    without the bitplan tables gets a one-line hint instead of a traceback."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from bitplan.app.db import make_engine, make_sessionmaker

    def run() -> T:
        url = get_settings().database_url
        engine = make_engine(url)
        try:
            with make_sessionmaker(engine)() as session:
                return action(session)
        except (OperationalError, ProgrammingError):
            raise InputError(
                f"the database {_safe_url(url)} has no bitplan tables; run "
                "`bitplan db upgrade` first"
            ) from None
        finally:
            engine.dispose()

    return run_command(run)


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Argument(help="Who the key is for.")]) -> None:
    """Create an API key and print it once; only its hash is stored."""
    from bitplan.app import crud

    plaintext = _with_keys(lambda session: crud.create_api_key(session, name=name)[1])
    typer.echo(plaintext)
    err_console.print(f"created API key {name!r}; store it now, it is not shown again")


@keys_app.command("list")
def keys_list() -> None:
    """List the API keys: name, id, created, revoked (the secrets are never stored)."""
    from bitplan.app import crud

    def rows(session: Session) -> list[tuple[str, str, str, str]]:
        return [
            (key.name, key.id, _when(key.created_at), _when(key.revoked_at))
            for key in crud.list_api_keys(session)
        ]

    keys = _with_keys(rows)
    if not keys:
        err_console.print("no API keys; create one with `bitplan keys create NAME`")
        return
    table = [("NAME", "ID", "CREATED", "REVOKED"), *keys]
    widths = [max(len(row[column]) for row in table) for column in range(3)]
    for row in table:  # plain aligned columns: never wrapped, easy to grep or cut
        padded = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
        typer.echo("  ".join([*padded, row[3]]))


@keys_app.command("revoke")
def keys_revoke(
    ref: Annotated[str, typer.Argument(metavar="ID|NAME", help="The key's id or name.")],
) -> None:
    """Revoke an API key: requests with it are refused (401) from now on."""
    from bitplan.app import crud

    def revoke(session: Session) -> tuple[str, str, bool]:
        key, revoked = crud.revoke_api_key(session, ref=ref)
        return key.name, key.id, revoked

    name, key_id, revoked = _with_keys(revoke)
    state = "revoked" if revoked else "was already revoked:"
    err_console.print(f"{state} API key {name!r} ({key_id})")


def _when(moment: datetime | None) -> str:
    """A key's timestamp for the listing: UTC to the second, '-' for never."""
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def serve(
    host: Annotated[str, _setting("host", "Interface to listen on.")] = _DEFAULTS["host"],
    port: Annotated[int, _setting("port", "TCP port.", low=0, high=65535)] = _DEFAULTS["port"],
    workers: Annotated[int, _setting("workers", "Worker processes.", low=0)] = _DEFAULTS["workers"],
) -> None:
    """Run the REST API with worker processes (migrates the database first)."""
    import uvicorn

    from bitplan.app.db import upgrade_database
    from bitplan.app.embedded import exit_on_sigterm
    from bitplan.app.main import create_app
    from bitplan.app.supervisor import WorkerSupervisor

    settings = get_settings().model_copy(update={"host": host, "port": port, "workers": workers})

    def prepare() -> Any:
        upgrade_database(settings.database_url)
        return create_app(settings)  # refuses an open server before anything starts

    api = run_command(prepare)
    supervisor = WorkerSupervisor(settings, count=settings.workers)
    exit_on_sigterm()  # before any worker starts: a SIGTERM from now on still stops them
    try:
        supervisor.start()  # restarts workers that die; they die with this process
        err_console.print(
            f"bitplan API on http://{settings.host}:{settings.port} with "
            f"{settings.workers} supervised worker(s); Ctrl-C stops everything"
        )
        uvicorn.run(api, host=settings.host, port=settings.port)
    finally:
        supervisor.stop()


def worker(
    once: Annotated[bool, typer.Option(help="Exit when the queue is empty.")] = False,
) -> None:
    """Run one worker: claim queued jobs and run them (SIGTERM releases the current one)."""
    from bitplan.app.worker import run_worker

    ran = run_worker(get_settings(), once=once)
    err_console.print(f"worker stopped after {ran} job(s)")
