"""HTTP schemas (pydantic v2) of the REST API, separate from the ORM models in ``app/models.py``.

``JobCreate`` is what a client posts: the fields of :class:`bitplan.search.spec.JobSpec` that a user
chooses, with ``model`` / ``calib`` naming an uploaded resource by id (or a builtin) instead of
a path on the server. Validation reuses the library's own parsers (formats, budgets, methods)
so the API accepts exactly what the CLI accepts, with the same messages. ``*Read`` schemas are
what the server answers; ids and links, never server paths.
"""

from __future__ import annotations

from copy import copy
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bitplan.app.states import JobState
from bitplan.search.budgets import parse_budget
from bitplan.search.fields import Format
from bitplan.search.plans import FrontierFile, FrontierPoint
from bitplan.search.spec import METHODS, SAMPLERS, JobSpec
from bitplan.sensitivity.builtin import BUILTIN_MODELS
from bitplan.sensitivity.format_spec import QuantFormat, parse_formats
from bitplan.sensitivity.models import TASKS

if TYPE_CHECKING:
    from bitplan.app.models import Blob

__all__ = [
    "BUILTIN_PREFIX",
    "DatasetRead",
    "DatasetsRead",
    "FrontierPointRead",
    "FrontierRead",
    "HealthRead",
    "JobCreate",
    "JobRead",
    "JobState",
    "JobsRead",
    "ModelRead",
    "ModelsRead",
]

BUILTIN_PREFIX = "builtin:"

# Resource ids and builtin names are short; a longer reference cannot name anything.
_MAX_REF_LENGTH = 128
_NEXT_CURSOR = "pass as ?cursor= for the next page; null on the last page"

Method = Literal[METHODS]  # type: ignore[valid-type]
Sampler = Literal[SAMPLERS]  # type: ignore[valid-type]
Task = Literal[TASKS]  # type: ignore[valid-type]


def _spec_field(name: str) -> Any:
    """A copy of :class:`JobSpec`'s field ``name``: its default, bounds and description, so the
    request restates none of them (pydantic takes a FieldInfo as a field's default)."""
    return copy(JobSpec.model_fields[name])


class _BlobRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="the resource's id; a job names it in 'model' or 'calib'")
    sha256: str = Field(description="sha256 of the uploaded bytes (the content address)")
    filename: str = Field(description="the file name the client uploaded")
    size_bytes: int = Field(description="size of the uploaded file in bytes")
    created_at: datetime = Field(description="when it was first uploaded (UTC)")


class ModelRead(_BlobRead):
    """An uploaded model (a .zip of a Hugging Face folder, a safetensors file, ...)."""


class DatasetRead(_BlobRead):
    """An uploaded calibration dataset (.txt, .jsonl or .safetensors)."""


class ModelsRead(BaseModel):
    """One page of models, newest first."""

    data: list[ModelRead] = Field(description="the models on this page")
    next_cursor: str | None = Field(description=_NEXT_CURSOR)


class DatasetsRead(BaseModel):
    """One page of datasets, newest first."""

    data: list[DatasetRead] = Field(description="the datasets on this page")
    next_cursor: str | None = Field(description=_NEXT_CURSOR)


class JobCreate(BaseModel):
    """A planning request. Unknown fields are refused, so a typo never silently uses a default.

    Defaults, bounds and descriptions are :class:`JobSpec`'s; ``model``/``calib`` name uploaded
    resources (or builtins) instead of server paths.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        min_length=1,
        max_length=_MAX_REF_LENGTH,
        description="the id of an uploaded model, or a builtin such as 'builtin:digits-cnn'",
        examples=["builtin:digits-cnn"],
    )
    calib: str = Field(
        "builtin",
        min_length=1,
        max_length=_MAX_REF_LENGTH,
        description="the id of an uploaded dataset, or 'builtin' for the model's builtin data",
    )
    budget: str = _spec_field("budget")
    formats: list[Format] = _spec_field("formats")
    method: Method = _spec_field("method")
    task: Task | None = _spec_field("task")
    trials: int = _spec_field("trials")
    timeout: float | None = _spec_field("timeout")
    seed: int = _spec_field("seed")
    sampler: Sampler = _spec_field("sampler")
    exclude: list[str] = _spec_field("exclude")
    pins: dict[str, Format] = _spec_field("pins")
    holdout: float = _spec_field("holdout")
    max_length: int = _spec_field("max_length")
    max_samples: int | None = _spec_field("max_samples")

    @field_validator("model")
    @classmethod
    def _check_builtin(cls, value: str) -> str:
        name = value.removeprefix(BUILTIN_PREFIX)
        if name != value and name not in BUILTIN_MODELS:
            accepted = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
            raise ValueError(f"unknown builtin model {value!r}; accepted: {accepted}")
        return value

    @field_validator("formats")
    @classmethod
    def _check_formats(cls, value: list[QuantFormat]) -> list[QuantFormat]:
        return parse_formats(value)  # the library's parser: a format listed twice is refused

    @field_validator("budget")
    @classmethod
    def _check_budget(cls, value: str) -> str:
        parse_budget(value)  # InputError is a ValueError: pydantic reports it as a field error
        return value.strip()

    def to_spec(self, *, model: Blob | None, dataset: Blob | None) -> JobSpec:
        """The :class:`JobSpec` a worker runs: an uploaded ``model``/``dataset`` (None: the
        request names a builtin) becomes its stored path, which the worker opens, and its file
        name, which results and errors show instead of that server path."""
        fields = self.model_dump(exclude={"model", "calib"})
        return JobSpec(
            model=model.path if model else self.model,
            calib=dataset.path if dataset else self.calib,
            model_name=model.filename if model else None,
            calib_name=dataset.filename if dataset else None,
            **fields,
        )


class JobRead(BaseModel):
    """A job: its state, how far it got, what was asked, and where its results are.

    ``progress``/``eta_s`` cover the whole job; ``stage_progress``/``stage_eta_s`` the current
    ``stage`` only, which restarts at 0 with every stage.
    """

    id: str = Field(description="the job's id")
    state: JobState = Field(
        description="queued, running, then succeeded, failed or cancelled (these three are final)"
    )
    stage: str = Field(
        description=(
            "what the job is doing: 'queued', 'starting', then the pipeline's stages in order "
            "(load, collect, analyze, frontier, reference, search, validate; collect only for "
            "data-driven methods), and finally its state"
        )
    )
    progress: float = Field(
        ge=0,
        le=1,
        description=(
            "fraction of the whole job done, 0 to 1; it only grows while an attempt runs (stages "
            "weighted by their usual share of the time) and is 1 once the job succeeded; a job "
            "retried after its worker was lost starts again from 0 (see attempts)"
        ),
    )
    eta_s: float | None = Field(
        description=(
            "estimated seconds until the whole job is done, from the time spent so far and "
            "'progress'; null before any progress and when the job is not running"
        )
    )
    stage_progress: float = Field(
        ge=0, le=1, description="fraction of the current stage done, 0 to 1"
    )
    stage_eta_s: float | None = Field(
        description="estimated seconds left in the current stage; null when unknown"
    )
    attempts: int = Field(
        description="how many times a worker has claimed the job (a lost worker's job is retried)"
    )
    error: str | None = Field(description="why the job failed; null unless it failed")
    cancel_requested: bool = Field(description="whether a cancel was requested")
    request: JobCreate = Field(description="the request as submitted")
    plans: list[str] = Field(
        description="ids of the job's plans (frontier points and uniform baselines; "
        "'best' is an alias of one of them), once the job succeeded"
    )
    created_at: datetime = Field(description="when the job was submitted (UTC)")
    started_at: datetime | None = Field(description="when a worker first claimed it (UTC)")
    finished_at: datetime | None = Field(description="when it reached its final state (UTC)")
    updated_at: datetime = Field(description="when the job last changed (UTC)")
    links: dict[str, str] = Field(
        description="related URLs: self, cancel, frontier, sensitivity, report"
    )


class JobsRead(BaseModel):
    """One page of jobs, newest first."""

    data: list[JobRead] = Field(description="the jobs on this page")
    next_cursor: str | None = Field(description=_NEXT_CURSOR)


class FrontierPointRead(FrontierPoint):
    """One point of the size/quality frontier, with a link to download its plan."""

    href: str = Field(description="where to download this point's plan")


class FrontierRead(FrontierFile):
    """The job's ``bitplan.frontier/v1`` file, with a download link on every point."""

    # Narrowing a field's type in a subclass is how pydantic models specialise; lists are
    # invariant to mypy, so it calls this an incompatible override.
    points: list[FrontierPointRead] = Field(  # type: ignore[assignment]
        description="the frontier, smallest first"
    )
    uniform: list[FrontierPointRead] = Field(  # type: ignore[assignment]
        description="uniform-format reference points"
    )


class HealthRead(BaseModel):
    """The service is up and its database answers; how many workers can run jobs, and how long
    the queue is (``/v1/health`` and ``/v1/health/ready``)."""

    status: Literal["ok", "degraded"] = Field(
        description="'ok', or 'degraded' while no worker is alive and submitted jobs would wait"
    )
    version: str = Field(description="the installed bitplan version ('unknown' from a source tree)")
    workers_alive: int = Field(
        ge=0, description="workers (on any machine) that reported within the last lease"
    )
    queue_depth: int = Field(ge=0, description="jobs waiting for a worker")
    oldest_queued_age_s: float | None = Field(
        ge=0, description="seconds the oldest queued job has waited; null when none waits"
    )
