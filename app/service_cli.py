"""Talking to a bitplan service from a terminal: what ``submit``, ``status``, ``wait``,
``cancel``, ``download`` and the demo share.

- :func:`guarded` turns API problems and an unreachable server into one line and exit code 2;
- :func:`upload_ref` hashes a local model (a folder is zipped reproducibly first) or data file
  and reuses the caller's earlier upload of the same bytes instead of sending them again;
- :func:`wait_with_progress` draws a job's stage and overall progress until it ends;
- :func:`download_job` saves a finished job's results into a folder that works offline;
- :func:`finished` ends a command with exit code 1 unless the job succeeded.

Running the service itself (the API thread and worker processes) is :mod:`bitplan.app.embedded`.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import httpx
import typer

from bitplan.app.archive import file_sha256, zip_folder
from bitplan.app.client import ApiError, BitplanClient
from bitplan.app.console import err_console, run_command
from bitplan.app.states import JobState
from bitplan.sensitivity.errors import InputError

if TYPE_CHECKING:
    from bitplan.search.plans import FrontierFile

__all__ = [
    "download_job",
    "file_sha256",
    "finished",
    "guarded",
    "local_frontier",
    "status_line",
    "upload_ref",
    "wait_with_progress",
    "zip_folder",
]

T = TypeVar("T")

_POLL_S = 0.5  # the API answers an unchanged job with a body-less 304, so polling is cheap
_BUILTIN = "builtin"  # `builtin` data and `builtin:NAME` models live on the server


def guarded(fn: Callable[[], T]) -> T:
    """Run ``fn``: input errors, API problems, network failures and waits that time out are one
    line, exit 2."""

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
        except TimeoutError as exc:  # a wait that ran out: one line, not a traceback
            raise InputError(str(exc)) from None

    return run_command(call)


def upload_ref(client: BitplanClient, ref: str, *, kind: Literal["model", "dataset"]) -> str:
    """What a job names for ``ref``: a builtin or an uploaded id as is; a local file (or a
    model folder, zipped) as the id of the caller's upload of the same bytes, uploading it only
    when the server does not have them yet."""
    path = Path(ref)
    if ref == _BUILTIN or ref.startswith(f"{_BUILTIN}:") or not path.exists():
        return ref
    if path.is_dir():
        if kind != "model":
            raise InputError(
                f"{ref} is a folder; a dataset is one .txt, .jsonl or .safetensors file"
            )
        with tempfile.TemporaryDirectory() as tmp:
            archive = zip_folder(path, Path(tmp) / f"{path.resolve().name}.zip")
            return _upload_file(client, archive, kind=kind, shown=path)
    return _upload_file(client, path, kind=kind, shown=path)


def _upload_file(
    client: BitplanClient, path: Path, *, kind: Literal["model", "dataset"], shown: Path
) -> str:
    existing = client.find_upload(kind, sha256=file_sha256(path))
    if existing is not None:
        err_console.print(
            f"{shown}: the server has these bytes already ({kind} {existing['id']}); "
            "not uploading again",
            highlight=False,
            soft_wrap=True,
        )
        return str(existing["id"])
    size_mb = path.stat().st_size / 1e6
    err_console.print(f"uploading {shown} ({size_mb:.1f} MB)", highlight=False, soft_wrap=True)
    upload = client.upload_model if kind == "model" else client.upload_dataset
    return str(upload(path)["id"])


def wait_with_progress(
    client: BitplanClient, job_id: str, *, timeout: float | None = None
) -> dict[str, Any]:
    """Poll a job until it ends, drawing its stage and overall progress; returns the final job."""
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (
        TextColumn("[bold]{task.fields[stage]:<10}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[eta]}"),
    )
    with Progress(*columns, console=err_console) as bars:
        task = bars.add_task(job_id, total=1.0, stage=JobState.QUEUED.value, eta="")

        def show(job: dict[str, Any]) -> None:
            bars.update(task, completed=job["progress"], stage=job["stage"], eta=_eta(job))

        return client.wait_job(job_id, poll_s=_POLL_S, timeout=timeout, progress=show)


def _eta(job: dict[str, Any]) -> str:
    return f"~{job['eta_s']:.0f}s left" if job.get("eta_s") else ""


def status_line(job: dict[str, Any]) -> str:
    """``ID: state (stage S, 45%, ~12s left)``."""
    eta = f", {_eta(job)}" if _eta(job) else ""
    return f"{job['id']}: {job['state']} (stage {job['stage']}, {job['progress']:.0%}{eta})"


def local_frontier(api_frontier: dict[str, Any]) -> FrontierFile:
    """The API's ``/frontier`` answer as a frontier file of a downloaded folder: the API names
    each plan by its URL (``href``), a folder by its relative path (``plans/<id>.json``)."""
    from bitplan.search.plans import FrontierFile

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
    """Save a succeeded job's frontier (``frontier.json``/``.csv``), every plan (and
    ``plans/best.json``), the sensitivity table and an offline ``report.html`` with its
    ``exports/`` (links relative to ``dest``) into ``dest``; returns every file written."""
    from bitplan.app.report import EXPORTS_DIR, render_report
    from bitplan.search.plans import BEST_PLAN_ID
    from bitplan.sensitivity.atomic import write_text_atomic

    # Everything is fetched before anything is written: a download that fails half-way (network,
    # retries exhausted) leaves an earlier download in this folder whole.
    frontier = client.frontier(job_id)
    plan_ids = [point["plan_id"] for point in [*frontier["points"], *frontier["uniform"]]]
    plans = {plan_id: client.plan(job_id, plan_id) for plan_id in [*plan_ids, BEST_PLAN_ID]}
    sensitivity = client.sensitivity(job_id)
    document = local_frontier(frontier)
    written = []
    for plan_id, text in plans.items():
        path = dest / "plans" / f"{plan_id}.json"
        write_text_atomic(path, text)
        written.append(path)
    for stale in (dest / "plans").glob("*.json"):  # an earlier download into the same folder
        if stale.stem not in plans:
            stale.unlink()
    write_text_atomic(dest / "frontier.json", json.dumps(document.to_dict(), indent=1) + "\n")
    write_text_atomic(dest / "frontier.csv", document.csv_text())
    write_text_atomic(dest / "sensitivity.csv", sensitivity)
    written += [dest / "frontier.json", dest / "frontier.csv", dest / "sensitivity.csv"]
    written.append(render_report(dest))
    written += sorted((dest / EXPORTS_DIR).iterdir())
    return written


def finished(job: dict[str, Any]) -> None:
    """Exit 1 with the reason unless the job succeeded."""
    if job["state"] != JobState.SUCCEEDED:
        reason = f": {job['error']}" if job.get("error") else ""
        err_console.print(f"[red]job {job['id']} {job['state']}[/red]{reason}", highlight=False)
        raise typer.Exit(code=1)
    err_console.print(
        f"[green]job {job['id']} succeeded[/green]: {len(job['plans'])} plans (frontier points "
        "and uniform baselines)"
    )
