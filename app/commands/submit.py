"""``submit``: queue a planning job on a bitplan service, uploading local files it needs.

Its options are the job's (see :mod:`~bitplan.app.commands._options`), so it lives apart from
``status``/``wait``/``cancel``/``download`` (:mod:`~bitplan.app.commands.jobs`), which then start
without reading :class:`~bitplan.search.spec.JobSpec`.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from bitplan.app.commands._options import (
    DEFAULT_FORMATS,
    DEFAULT_ROUNDING,
    BudgetOpt,
    ExcludeOpt,
    FormatsOpt,
    FuseOpt,
    HoldoutOpt,
    MaxLengthOpt,
    MaxSamplesOpt,
    MethodOpt,
    PinOpt,
    RoundingOpt,
    SamplerOpt,
    SeedOpt,
    TaskOpt,
    TimeoutOpt,
    TrialsOpt,
    parse_fuse,
    request_fields,
)
from bitplan.app.commands.jobs import KeyOpt, UrlOpt
from bitplan.app.endpoint import DEFAULT_URL
from bitplan.app.spec_defaults import spec_default

__all__ = ["submit"]


def submit(
    model: Annotated[
        str,
        typer.Argument(
            help="builtin:NAME, an uploaded model id, or a model file/folder to upload."
        ),
    ],
    budget: BudgetOpt,
    calib: Annotated[
        str,
        typer.Option(help="builtin, an uploaded dataset id, or a .txt/.jsonl/.safetensors file."),
    ] = spec_default("calib"),
    task: TaskOpt = spec_default("task"),
    formats: FormatsOpt = DEFAULT_FORMATS,
    rounding: RoundingOpt = DEFAULT_ROUNDING,
    method: MethodOpt = spec_default("method"),
    trials: TrialsOpt = spec_default("trials"),
    timeout: TimeoutOpt = spec_default("timeout"),
    seed: SeedOpt = spec_default("seed"),
    sampler: SamplerOpt = spec_default("sampler"),
    exclude: ExcludeOpt = None,
    pin: PinOpt = None,
    fuse: FuseOpt = None,
    holdout: HoldoutOpt = spec_default("holdout"),
    max_length: MaxLengthOpt = spec_default("max_length"),
    max_samples: MaxSamplesOpt = spec_default("max_samples"),
    wait: Annotated[bool, typer.Option(help="Wait with a progress bar.")] = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Queue a planning job and print its id.

    A local model or data file is uploaded unless the server already has the same bytes.
    """
    from bitplan.app.client import BitplanClient
    from bitplan.app.service_cli import finished, guarded, upload_ref, wait_with_progress

    def run() -> dict[str, Any]:
        fields = request_fields(
            formats=formats,
            rounding=rounding,
            exclude=exclude,
            pin=pin,
            fuse=parse_fuse(fuse),
            task=task,
            method=method,
            trials=trials,
            timeout=timeout,
            seed=seed,
            sampler=sampler,
            holdout=holdout,
            max_length=max_length,
            max_samples=max_samples,
        )
        with BitplanClient(url, api_key=api_key) as client:
            job = client.submit_job(
                model=upload_ref(client, model, kind="model"),
                calib=upload_ref(client, calib, kind="dataset"),
                budget=budget,
                **fields,
            )
            typer.echo(job["id"])
            return wait_with_progress(client, job["id"]) if wait else job

    job = guarded(run)
    if wait:
        finished(job)
