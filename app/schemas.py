"""HTTP schemas (pydantic v2) of the REST API, separate from the ORM models in ``app/models.py``.

``JobCreate`` is what a client posts: the fields of :class:`bitplan.search.spec.JobSpec` that a user
chooses, with ``model`` / ``calib`` naming an uploaded resource by id (or a builtin) instead of
a path on the server. Validation reuses the library's own parsers (formats, budgets, methods)
so the API accepts exactly what the CLI accepts, with the same messages. ``*Read`` schemas are
what the server answers; ids and links, never server paths.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bitplan.app.models import JOB_STATES
from bitplan.search.budgets import parse_budget
from bitplan.search.spec import METHODS, SAMPLERS, JobSpec
from bitplan.sensitivity.builtin import BUILTIN_MODELS
from bitplan.sensitivity.formats import DEFAULT_FORMATS, parse_format, parse_formats
from bitplan.sensitivity.models import TASKS

__all__ = [
    "BUILTIN_PREFIX",
    "DatasetRead",
    "DatasetsRead",
    "FrontierPointRead",
    "FrontierRead",
    "JobCreate",
    "JobRead",
    "JobState",
    "JobsRead",
    "ModelRead",
    "ModelsRead",
]

BUILTIN_PREFIX = "builtin:"

_NEXT_CURSOR = "pass as ?cursor= for the next page; null on the last page"

Method = Literal[METHODS]  # type: ignore[valid-type]
Sampler = Literal[SAMPLERS]  # type: ignore[valid-type]
Task = Literal[TASKS]  # type: ignore[valid-type]
JobState = Literal[JOB_STATES]  # type: ignore[valid-type]


class _BlobRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    sha256: str = Field(description="sha256 of the uploaded bytes (the content address)")
    filename: str = Field(description="the file name the client uploaded")
    size_bytes: int
    created_at: datetime


class ModelRead(_BlobRead):
    """An uploaded model (a .zip of a Hugging Face folder, a safetensors file, ...)."""


class DatasetRead(_BlobRead):
    """An uploaded calibration dataset (.txt, .jsonl or .safetensors)."""


class ModelsRead(BaseModel):
    data: list[ModelRead]
    next_cursor: str | None = Field(description=_NEXT_CURSOR)


class DatasetsRead(BaseModel):
    data: list[DatasetRead]
    next_cursor: str | None = Field(description=_NEXT_CURSOR)


class JobCreate(BaseModel):
    """A planning request. Unknown fields are refused, so a typo never silently uses a default."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        min_length=1,
        description="the id of an uploaded model, or a builtin such as 'builtin:digits-cnn'",
        examples=["builtin:digits-cnn"],
    )
    calib: str = Field(
        "builtin",
        min_length=1,
        description="the id of an uploaded dataset, or 'builtin' for the model's builtin data",
    )
    budget: str = Field(description="'4.5bpw', '60MB', '58MiB' or '0.3x'", examples=["4.5bpw"])
    formats: list[str] = Field(default_factory=lambda: list(DEFAULT_FORMATS), min_length=1)
    method: Method = JobSpec.method  # type: ignore[assignment]
    task: Task | None = None  # type: ignore[valid-type]
    trials: int = Field(JobSpec.trials, ge=0)
    timeout: float | None = Field(None, gt=0, description="seconds for the measured search")
    seed: int = JobSpec.seed
    sampler: Sampler = JobSpec.sampler  # type: ignore[assignment]
    exclude: list[str] = Field(default_factory=list, description="fnmatch patterns of layers")
    pins: dict[str, str] = Field(default_factory=dict, description="layer pattern -> format")
    holdout: float = Field(JobSpec.holdout, gt=0, lt=1)
    max_length: int = Field(JobSpec.max_length, gt=0)
    max_samples: int | None = Field(None, gt=0)

    @field_validator("model")
    @classmethod
    def _check_builtin(cls, value: str) -> str:
        name = value.removeprefix(BUILTIN_PREFIX)
        if name != value and name not in BUILTIN_MODELS:
            accepted = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
            raise ValueError(f"unknown builtin model {value!r}; accepted: {accepted}")
        return value

    @field_validator("budget")
    @classmethod
    def _check_budget(cls, value: str) -> str:
        parse_budget(value)  # InputError is a ValueError: pydantic reports it as a field error
        return value.strip()

    @field_validator("formats")
    @classmethod
    def _check_formats(cls, value: list[str]) -> list[str]:
        return [fmt.name for fmt in parse_formats(value)]

    @field_validator("pins")
    @classmethod
    def _check_pins(cls, value: dict[str, str]) -> dict[str, str]:
        return {pattern: parse_format(name).name for pattern, name in value.items()}

    def to_spec(self, *, model_ref: str, calib_ref: str) -> JobSpec:
        """The :class:`JobSpec` a worker runs, with ``model``/``calib`` resolved to references
        the worker can open (a builtin name or a stored file path)."""
        fields = self.model_dump(exclude={"model", "calib"})
        return JobSpec(model=model_ref, calib=calib_ref, **fields)


class JobRead(BaseModel):
    """A job's state. ``progress`` is a fraction in [0, 1]; ``eta_s`` seconds or null."""

    id: str
    state: JobState
    stage: str
    progress: float = Field(ge=0, le=1)
    eta_s: float | None
    attempts: int
    error: str | None
    cancel_requested: bool
    request: JobCreate
    plans: list[str] = Field(description="plan ids on the frontier, once the job succeeded")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    links: dict[str, str]


class JobsRead(BaseModel):
    data: list[JobRead]
    next_cursor: str | None = Field(description=_NEXT_CURSOR)


class FrontierPointRead(BaseModel):
    """One point of the size/quality frontier (``metrics`` holds calibration and holdout)."""

    plan_id: str
    total_bytes: int
    bpw: float
    predicted_error: float | None
    metrics: dict[str, dict[str, float]]
    source: str = Field(description="'exact', 'search' or 'uniform' (how the point was found)")
    href: str = Field(description="where to download this point's plan")


class FrontierRead(BaseModel):
    """The job's ``bitplan.frontier/v1`` file, with a download link on every point."""

    model_config = ConfigDict(populate_by_name=True)

    schema_: str = Field(alias="schema")
    model: dict[str, str]
    budget: dict[str, Any] | None
    points: list[FrontierPointRead]
    uniform: list[FrontierPointRead] = Field(description="uniform-format reference points")
