"""The service half of the ``bitplan`` command line: run the service, and talk to one.

``register(app)`` adds to the main typer app:

- operator commands, on this machine's settings (``BITPLAN_*``): ``db upgrade``, ``serve``
  (migrations, worker processes, the API), ``worker``, ``keys create NAME``;
- client commands, over HTTP with :class:`bitplan.app.client.BitplanClient`: ``submit``, ``status``,
  ``wait`` (a live progress bar), ``download``; ``--url``/``--api-key`` or ``BITPLAN_URL`` /
  ``BITPLAN_API_KEY``;
- ``demo`` (see :mod:`bitplan.app.demo`).

Bad input, API errors and an unreachable server print one line and exit 2; a job that ends
failed or cancelled exits 1. :func:`embedded_service` runs the API on a background thread with
worker processes (the demo and the tests use it), :func:`download_job` fetches a job's results
into a folder that works offline.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import httpx
import typer
import uvicorn
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from sqlalchemy.exc import OperationalError, ProgrammingError

from bitplan.app.client import ApiError, BitplanClient
from bitplan.app.console import console, err_console, exit_on_input_error
from bitplan.app.settings import Settings, get_settings
from bitplan.search.plans import FrontierFile
from bitplan.sensitivity.errors import InputError

__all__ = [
    "download_job",
    "embedded_service",
    "local_frontier",
    "register",
    "stop_workers",
    "wait_with_progress",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Seconds a worker gets to release its job after SIGTERM before it is killed, and the API to
# finish its requests: long enough for one database write, short enough for a person waiting.
_STOP_GRACE_S = 10.0
_STARTUP_TIMEOUT_S = 30.0  # the API thread must be listening by then
_POLL_S = 0.5  # the API answers an unchanged job with a body-less 304, so polling is cheap

UrlOpt = Annotated[str, typer.Option("--url", envvar="BITPLAN_URL", help="The server's URL.")]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key", envvar="BITPLAN_API_KEY", help="An API key from `bitplan keys create`."
    ),
]
DEFAULT_URL = "http://127.0.0.1:8000"


def _guarded(fn: Callable[[], T]) -> T:
    """Run ``fn``: input errors, API problems and network failures are one line, exit 2."""

    def call() -> T:
        try:
            return fn()
        except ApiError as exc:
            detail = exc.problem.get("detail") or exc.problem.get("title") or ""
            raise InputError(f"the server answered {exc.status}: {detail}") from None
        except httpx.TransportError as exc:
            raise InputError(
                f"cannot reach the bitplan server ({exc}); start one with "
                "`bitplan serve` or pass --url"
            ) from None

    return exit_on_input_error(call)


# --- running the service -------------------------------------------------------------------------


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def stop_workers(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every worker (each releases its job to the queue), then kill stragglers."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_S
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            logger.warning("worker %d ignored SIGTERM; killing it", process.pid)
            process.kill()
            process.wait()


@contextmanager
def embedded_service(
    settings: Settings, *, workers: int = 1, worker_log: Path | None = None
) -> Iterator[str]:
    """Migrate, serve the API on a background thread and start ``workers`` worker processes;
    yields the API's base URL and stops everything on exit (Ctrl-C and errors included).

    ``settings.port`` 0 picks a free port. ``worker_log`` receives the workers' output, so it
    does not tear through a progress bar on this terminal.
    """
    from bitplan.app.db import upgrade_database
    from bitplan.app.main import create_app
    from bitplan.app.worker import spawn_workers

    upgrade_database(settings.database_url)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=int(_STOP_GRACE_S),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="bitplan-api", daemon=True)
    thread.start()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise InputError(f"the API could not listen on {settings.host}:{settings.port}")
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        with _stderr_to(worker_log):
            processes = spawn_workers(settings.model_copy(update={"port": port}), count=workers)
        yield f"http://{settings.host}:{port}"
    finally:
        stop_workers(processes)
        server.should_exit = True
        thread.join(_STOP_GRACE_S)


@contextmanager
def _stderr_to(path: Path | None) -> Iterator[None]:
    """Point file descriptor 2 at ``path`` while child processes are started (they inherit
    it); this process's own stderr is restored right after."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = os.dup(2)
    with path.open("ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# --- talking to a service ------------------------------------------------------------------------


def _upload_ref(client: BitplanClient, ref: str, *, kind: str) -> str:
    """A builtin or an uploaded id as is; a file (or a model folder, zipped) is uploaded."""
    path = Path(ref)
    if ref.startswith("builtin") or not path.exists():
        return ref
    if path.is_dir():
        if kind != "model":
            raise InputError(
                f"{ref} is a folder; a dataset is one .txt, .jsonl or .safetensors file"
            )
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / f"{path.resolve().name}.zip"
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
                for item in sorted(path.rglob("*")):
                    if item.is_file():
                        zipped.write(item, item.relative_to(path).as_posix())
            return _upload_ref(client, str(archive), kind=kind)
    err_console.print(f"uploading {path} ({path.stat().st_size / 1e6:.1f} MB)")
    upload = client.upload_model if kind == "model" else client.upload_dataset
    return str(upload(path)["id"])


def wait_with_progress(
    client: BitplanClient, job_id: str, *, timeout: float | None = None
) -> dict[str, Any]:
    """Poll a job until it ends, drawing its stage and progress; returns the final job."""
    columns = (
        TextColumn("[bold]{task.fields[stage]:<10}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[eta]}"),
    )
    with Progress(*columns, console=err_console) as bars:
        task = bars.add_task(job_id, total=1.0, stage="queued", eta="")

        def show(job: dict[str, Any]) -> None:
            eta = f"~{job['eta_s']:.0f}s left in stage" if job.get("eta_s") else ""
            bars.update(task, completed=job["progress"], stage=job["stage"], eta=eta)

        return client.wait_job(job_id, poll_s=_POLL_S, timeout=timeout, progress=show)


def local_frontier(api_frontier: dict[str, Any]) -> FrontierFile:
    """The API's ``/frontier`` answer as a frontier file of a downloaded folder: the API names
    each plan by its URL (``href``), a folder by its relative path (``plans/<id>.json``)."""
    return FrontierFile.from_dict(
        {
            **api_frontier,
            **{
                key: [
                    {
                        **{k: v for k, v in p.items() if k != "href"},
                        "plan": f"plans/{p['plan_id']}.json",
                    }
                    for p in api_frontier[key]
                ]
                for key in ("points", "uniform")
            },
        }
    )


def download_job(client: BitplanClient, job_id: str, dest: Path) -> list[Path]:
    """Save a succeeded job's frontier (``frontier.json``/``.csv``), every plan, the sensitivity
    table and an offline ``report.html`` (links relative to ``dest``) into ``dest``."""
    from bitplan.app.report import render_report

    frontier = client.frontier(job_id)
    (dest / "plans").mkdir(parents=True, exist_ok=True)
    written = []
    for point in [*frontier["points"], *frontier["uniform"]]:
        path = dest / "plans" / f"{point['plan_id']}.json"
        path.write_text(client.plan(job_id, point["plan_id"]), encoding="utf-8")
        written.append(path)
    document = local_frontier(frontier)
    (dest / "frontier.json").write_text(
        json.dumps(document.to_dict(), indent=1) + "\n", encoding="utf-8"
    )
    (dest / "frontier.csv").write_text(document.csv_text(), encoding="utf-8")
    (dest / "sensitivity.csv").write_text(client.sensitivity(job_id), encoding="utf-8")
    written += [dest / "frontier.json", dest / "frontier.csv", dest / "sensitivity.csv"]
    written.append(render_report(dest))
    return written


def _finished(job: dict[str, Any]) -> None:
    """Exit 1 with the reason unless the job succeeded."""
    if job["state"] != "succeeded":
        reason = f": {job['error']}" if job.get("error") else ""
        err_console.print(f"[red]job {job['id']} {job['state']}[/red]{reason}", highlight=False)
        raise typer.Exit(code=1)
    err_console.print(f"[green]job {job['id']} succeeded[/green]: {len(job['plans'])} plans")


# --- commands ------------------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    """Add the service commands to the main ``bitplan`` app."""
    db = typer.Typer(help="The service database.", no_args_is_help=True)
    keys = typer.Typer(help="API keys.", no_args_is_help=True)
    app.add_typer(db, name="db")
    app.add_typer(keys, name="keys")

    @db.command("upgrade")
    def db_upgrade() -> None:
        """Apply the database migrations (BITPLAN_DATABASE_URL) up to the newest."""
        from bitplan.app.db import upgrade_database

        url = get_settings().database_url
        upgrade_database(url)
        err_console.print(f"database schema is up to date ({_safe_url(url)})")

    @keys.command("create")
    def keys_create(name: Annotated[str, typer.Argument(help="Who the key is for.")]) -> None:
        """Create an API key and print it once; only its hash is stored."""
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

        plaintext = exit_on_input_error(create)
        typer.echo(plaintext)
        err_console.print(f"created API key {name!r}; store it now, it is not shown again")

    @app.command("serve")
    def serve(
        host: Annotated[str | None, typer.Option(help="Interface to listen on.")] = None,
        port: Annotated[int | None, typer.Option(min=0, max=65535, help="TCP port.")] = None,
        workers: Annotated[int | None, typer.Option(min=0, help="Worker processes.")] = None,
    ) -> None:
        """Run the REST API with worker processes (migrates the database first)."""
        from bitplan.app.db import upgrade_database
        from bitplan.app.main import create_app
        from bitplan.app.worker import spawn_workers

        changes = {"host": host, "port": port, "workers": workers}
        settings = get_settings().model_copy(
            update={k: v for k, v in changes.items() if v is not None}
        )

        def prepare() -> Any:
            upgrade_database(settings.database_url)
            return create_app(settings)  # refuses an open server before anything starts

        api = exit_on_input_error(prepare)
        processes = spawn_workers(settings, count=settings.workers)
        err_console.print(
            f"bitplan API on http://{settings.host}:{settings.port} with "
            f"{settings.workers} worker(s); Ctrl-C stops everything"
        )
        # uvicorn re-raises the signal that stopped it once it has shut down; with the default
        # SIGTERM action that would end the process before the workers are stopped.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        try:
            uvicorn.run(api, host=settings.host, port=settings.port)
        finally:
            stop_workers(processes)

    @app.command("worker")
    def worker(
        once: Annotated[bool, typer.Option(help="Exit when the queue is empty.")] = False,
    ) -> None:
        """Run one worker: claim queued jobs and run them (SIGTERM releases the current one)."""
        from bitplan.app.worker import run_worker

        ran = run_worker(get_settings(), once=once)
        err_console.print(f"worker stopped after {ran} job(s)")

    @app.command("submit")
    def submit(
        model: Annotated[
            str,
            typer.Argument(
                help="builtin:NAME, an uploaded model id, or a model file/folder to upload."
            ),
        ],
        budget: Annotated[str, typer.Option(help="4.5bpw, 60MB, 58MiB or 0.3x.")],
        calib: Annotated[
            str,
            typer.Option(
                help="builtin, an uploaded dataset id, or a .txt/.jsonl/.safetensors file."
            ),
        ] = "builtin",
        method: Annotated[str, typer.Option(help="weight, layer, fisher or e2e.")] = "fisher",
        trials: Annotated[int, typer.Option(min=0, help="Measured trials.")] = 40,
        formats: Annotated[str | None, typer.Option(help="Comma-separated formats.")] = None,
        timeout: Annotated[float | None, typer.Option(help="Search seconds.")] = None,
        seed: Annotated[int, typer.Option(help="Seed.")] = 0,
        wait: Annotated[bool, typer.Option(help="Wait with a progress bar.")] = False,
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = None,
    ) -> None:
        """Queue a planning job; prints its id."""

        def run() -> dict[str, Any]:
            with BitplanClient(url, api_key=api_key) as client:
                fields: dict[str, Any] = {
                    "budget": budget,
                    "method": method,
                    "trials": trials,
                    "seed": seed,
                }
                if timeout is not None:
                    fields["timeout"] = timeout
                if formats:
                    fields["formats"] = [f.strip() for f in formats.split(",") if f.strip()]
                job = client.submit_job(
                    model=_upload_ref(client, model, kind="model"),
                    calib=_upload_ref(client, calib, kind="dataset"),
                    **fields,
                )
                typer.echo(job["id"])
                return wait_with_progress(client, job["id"]) if wait else job

        job = _guarded(run)
        if wait:
            _finished(job)

    @app.command("status")
    def status(
        job_id: Annotated[str, typer.Argument(help="The job id.")],
        as_json: Annotated[bool, typer.Option("--json", help="Print the job's JSON.")] = False,
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = None,
    ) -> None:
        """Show a job's state, stage and progress."""
        job = _guarded(lambda: _get(url, api_key, job_id))
        if as_json:
            typer.echo(json.dumps(job, indent=1))
            return
        eta = f", ~{job['eta_s']:.0f}s left in stage" if job.get("eta_s") else ""
        console.print(
            f"{job['id']}: {job['state']} (stage {job['stage']}, {job['progress']:.0%}{eta})",
            highlight=False,
        )
        if job.get("error"):
            console.print(f"error: {job['error']}", highlight=False)
        if job["plans"]:
            console.print(f"plans: {', '.join(job['plans'])}", highlight=False)

    @app.command("wait")
    def wait_cmd(
        job_id: Annotated[str, typer.Argument(help="The job id.")],
        timeout: Annotated[float | None, typer.Option(help="Give up after S seconds.")] = None,
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = None,
    ) -> None:
        """Wait for a job with a progress bar; exit 1 unless it succeeded."""

        def run() -> dict[str, Any]:
            with BitplanClient(url, api_key=api_key) as client:
                try:
                    return wait_with_progress(client, job_id, timeout=timeout)
                except TimeoutError as exc:
                    raise InputError(str(exc)) from None

        _finished(_guarded(run))

    @app.command("download")
    def download(
        job_id: Annotated[str, typer.Argument(help="The job id.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = None,
    ) -> None:
        """Save a succeeded job's frontier, plans, sensitivity table and report."""

        def run() -> list[Path]:
            with BitplanClient(url, api_key=api_key) as client:
                return download_job(client, job_id, out)

        files = _guarded(run)
        console.print(f"wrote {len(files)} files to {out}; open {out / 'report.html'}")

    @app.command("demo")
    def demo(
        out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
            "bitplan-demo"
        ),
        model: Annotated[str, typer.Option(help="A builtin model.")] = "builtin:digits-cnn",
        budget: Annotated[str, typer.Option(help="The memory budget.")] = "4bpw",
        trials: Annotated[int, typer.Option(min=1, help="Measured trials.")] = 16,
    ) -> None:
        """Run the whole service locally on a builtin model and download its results."""
        from bitplan.app.demo import run_demo

        job = _guarded(lambda: run_demo(out_dir=out, model=model, budget=budget, trials=trials))
        _finished(job)


def _get(url: str, api_key: str | None, job_id: str) -> dict[str, Any]:
    with BitplanClient(url, api_key=api_key) as client:
        return client.get_job(job_id)


def _safe_url(url: str) -> str:
    """A database URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
