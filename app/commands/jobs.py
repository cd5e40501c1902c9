"""``status``, ``wait``, ``cancel``, ``download`` and ``model``: a job on a bitplan service
(``submit`` is in :mod:`~bitplan.app.commands.submit`, with the job options).

They talk HTTP through :class:`~bitplan.app.client.BitplanClient` (``--url``/``--api-key`` or
``BITPLAN_URL``/``BITPLAN_API_KEY``); the client is imported inside each command, so ``bitplan
--help`` does not load an HTTP stack. Bad input, API problems and an unreachable server are one
line and exit code 2; a job that ends failed or cancelled makes ``wait`` (and ``submit --wait``)
exit 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from bitplan.app.commands._paths import OutOpt
from bitplan.app.console import console, err_console, output_folder
from bitplan.app.endpoint import DEFAULT_URL
from bitplan.app.states import JobState
from bitplan.search.targets import DEFAULT_TARGET, TARGETS

__all__ = ["JobIdArg", "KeyOpt", "UrlOpt", "cancel", "download", "model", "status", "wait"]

UrlOpt = Annotated[str, typer.Option("--url", envvar="BITPLAN_URL", help="The server's URL.")]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key", envvar="BITPLAN_API_KEY", help="An API key from `bitplan keys create`."
    ),
]
JobIdArg = Annotated[str, typer.Argument(help="The job id.")]


def status(
    job_id: JobIdArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job's JSON.")] = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Show a job's state, stage and progress."""
    from bitplan.app.client import BitplanClient
    from bitplan.app.service_cli import guarded, status_line

    def get() -> dict[str, Any]:
        with BitplanClient(url, api_key=api_key) as client:
            return client.get_job(job_id)

    job = guarded(get)
    if as_json:
        typer.echo(json.dumps(job, indent=1))
        return
    console.print(status_line(job), highlight=False)
    if job.get("error"):
        console.print(f"error: {job['error']}", highlight=False)
    if job["plans"]:
        console.print(f"plans: {', '.join(job['plans'])}", highlight=False)


def wait(
    job_id: JobIdArg,
    timeout: Annotated[float | None, typer.Option(help="Give up after S seconds.")] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Wait for a job with a progress bar; exit 1 unless it succeeded."""
    from bitplan.app.client import BitplanClient
    from bitplan.app.service_cli import finished, guarded, wait_with_progress

    def run() -> dict[str, Any]:
        with BitplanClient(url, api_key=api_key) as client:
            return wait_with_progress(client, job_id, timeout=timeout)

    finished(guarded(run))


def cancel(job_id: JobIdArg, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None) -> None:
    """Cancel a job: a queued one at once, a running one at its next check."""
    from bitplan.app.client import BitplanClient
    from bitplan.app.service_cli import guarded, status_line

    def run() -> dict[str, Any]:
        with BitplanClient(url, api_key=api_key) as client:
            return client.cancel_job(job_id)

    job = guarded(run)
    console.print(status_line(job), highlight=False)
    if job["state"] == JobState.RUNNING:
        err_console.print("its worker stops it at the next check (between layers or trials)")


def download(
    job_id: JobIdArg,
    out: OutOpt,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Save a succeeded job's frontier, plans, sensitivity table and report."""
    from bitplan.app.client import BitplanClient
    from bitplan.app.service_cli import download_job, guarded

    def run() -> list[Path]:
        with BitplanClient(url, api_key=api_key) as client, output_folder(out):
            return download_job(client, job_id, out)

    files = guarded(run)
    console.print(f"wrote {len(files)} files to {out}; open {out / 'report.html'}")


def model(
    job_id: JobIdArg,
    plan_id: Annotated[str, typer.Argument(help="A plan id of the job (`bitplan status`).")],
    out: OutOpt,
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="The runtime: "
            + "; ".join(f"{t.name}: {t.description}" for t in TARGETS.values()),
        ),
    ] = DEFAULT_TARGET,
    timeout: Annotated[float | None, typer.Option(help="Give up after S seconds.")] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Save a plan of a succeeded job applied to the job's model for a runtime, as `bitplan
    apply MODEL PLAN --to TARGET -o OUT` writes it; a worker of the service makes it, and this
    waits while it does."""
    from bitplan.app.client import BitplanClient
    from bitplan.app.service_cli import guarded

    def run() -> list[Path]:
        with (
            BitplanClient(url, api_key=api_key) as client,
            err_console.status(f"asking for the {to} export of {plan_id}") as shown,
            output_folder(out),
        ):

            def show(export: dict[str, Any]) -> None:
                shown.update(
                    f"{to} export of {plan_id}: {export['state']} ({export['progress']:.0%})"
                )

            return client.download_model(
                job_id, plan_id, out, to=to, timeout=timeout, progress=show
            )

    files = guarded(run)
    size = sum(path.stat().st_size for path in files)
    console.print(f"wrote {len(files)} file(s) to {out}: {size} bytes", highlight=False)
