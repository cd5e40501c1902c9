"""HTTP schemas (pydantic v2) of the REST API, separate from the ORM models in ``app/models.py``.

``JobCreate`` is what a client posts: the fields of :class:`bitplan.search.spec.JobSpec` that a user
chooses, with ``model`` / ``calib`` naming an uploaded resource by id (or a builtin) instead of
a path on the server. Validation reuses the library's own parsers (formats, budgets, methods)
so the API accepts exactly what the CLI accepts, with the same messages. ``*Read`` schemas are
what the server answers; ids and links, never server paths.
"""

from __future__ import annotations

import re
from copy import copy
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from bitplan.app.states import JobState
from bitplan.search.budgets import BYTE_UNITS, parse_budget
from bitplan.search.fields import Format, Rounding
from bitplan.search.plans import FrontierFile, FrontierPoint
from bitplan.search.spec import METHODS, SAMPLERS, FuseRule, JobSpec
from bitplan.sensitivity.builtin import BUILTIN_MODELS
from bitplan.sensitivity.format_spec import (
    ALLOWED_BITS,
    FLOAT_BYTES,
    GGML_TYPES,
    QuantFormat,
    parse_formats,
)
from bitplan.sensitivity.models import TASKS

if TYPE_CHECKING:
    from bitplan.app.models import Blob

__all__ = [
    "BUDGET_PATTERN",
    "BUILTIN_CALIB",
    "BUILTIN_PREFIX",
    "DatasetRead",
    "DatasetsRead",
    "FORMAT_PATTERN",
    "FrontierPointRead",
    "FrontierRead",
    "HealthRead",
    "JobCreate",
    "JobRead",
    "JobRequestRead",
    "JobState",
    "JobsRead",
    "ModelExportRead",
    "ModelRead",
    "ModelsRead",
    "StageRead",
]

BUILTIN_PREFIX = "builtin:"

# Resource ids and builtin names are short; a longer reference cannot name anything.
_MAX_REF_LENGTH = 128
# An upload's id as the server mints it (bitplan.app.models.new_id: a lower-case uuid4).
_ID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_ID_RE = re.compile(_ID)
_ID_EXAMPLE = "3f2b8c1e-5a4d-4e6f-9b7a-0c1d2e3f4a5b"
_BUILTIN_MODEL_REFS = [BUILTIN_PREFIX + name for name in BUILTIN_MODELS]
BUILTIN_CALIB = "builtin"


def _literal(text: str) -> str:
    """``text`` as a regular expression; unlike re.escape, no ``\\-`` (an ECMA-262 syntax
    error in Unicode mode)."""
    return "".join(c if c.isalnum() or c in ":_-" else "\\" + c for c in text)


# What "model" and "calib" may name, as one pattern each (an anyOf of an enum and a pattern says
# the same, but makes schema-driven test generation many times slower).
_MODEL_REF_PATTERN = f"^(?:{'|'.join(map(_literal, _BUILTIN_MODEL_REFS))}|{_ID})$"
_CALIB_REF_PATTERN = f"^(?:{_literal(BUILTIN_CALIB)}|{_ID})$"
_NEXT_CURSOR = "pass as ?cursor= for the next page; null on the last page"

Method = Literal[METHODS]  # type: ignore[valid-type]
Sampler = Literal[SAMPLERS]  # type: ignore[valid-type]
Task = Literal[TASKS]  # type: ignore[valid-type]

# --- request patterns ----------------------------------------------------------------------
# The OpenAPI document states exactly which budgets and format names a job request may carry,
# so a client (or a fuzzer) that follows the schema never sends a request the server refuses.
# JSON Schema patterns are ECMA-262 without flags, hence [bB] classes for case-insensitive units,
# and [0-9] rather than \d, which matches every Unicode digit in Python and in pydantic.


def _any_case(word: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else _literal(c) for c in word)


_POSITIVE = r"0*(?:[1-9][0-9]*(?:\.[0-9]*)?|\.[0-9]*[1-9][0-9]*)"  # > 0
_UP_TO_32 = r"0*(?:(?:[1-9]|[12][0-9]|3[01])(?:\.[0-9]*)?|32(?:\.0*)?|\.[0-9]*[1-9][0-9]*)"
_AT_LEAST_1 = r"0*[1-9][0-9]*(?:\.[0-9]*)?"
_AT_LEAST_0_001 = r"0*(?:[1-9][0-9]*(?:\.[0-9]*)?|\.(?:[1-9]|0[1-9]|00[1-9])[0-9]*)"
# A byte unit of 1000 bytes or more holds one byte from 0.001 of it; a smaller one from 1.
_KILO = 1000


def _budget(number: str, units: list[str]) -> str:
    return f"{number} ?(?:{'|'.join(_any_case(unit) for unit in units)})"


# parse_budget's syntax less what it refuses (zero, more than 32 bpw for fp32, under one byte).
# Sizes under 0.001 of a kB-or-larger unit and spaces around the budget are left out too: the
# API takes exactly what this pattern says.
BUDGET_PATTERN = (
    "^(?:"
    + "|".join(
        [
            _budget(_UP_TO_32, ["bpw"]),
            _budget(_POSITIVE, ["x"]),
            _budget(_AT_LEAST_1, [unit for unit, size in BYTE_UNITS.items() if size < _KILO]),
            _budget(_AT_LEAST_0_001, [unit for unit, size in BYTE_UNITS.items() if size >= _KILO]),
        ]
    )
    + ")$"
)
_BUDGET_RE = re.compile(BUDGET_PATTERN)

# Format names as parse_format writes them back (lower case, DESIGN §3).
FORMAT_PATTERN = (
    "^(?:"
    + "|".join(
        [
            *FLOAT_BYTES,
            "fp8-e4m3",
            f"int0*(?:{'|'.join(map(str, ALLOWED_BITS))})(?:-g0*[1-9][0-9]*)?(?:-asym)?",
            *GGML_TYPES,
        ]
    )
    + ")$"
)
# A format in a request: the shared Format type, its JSON schema with the pattern added.
RequestFormat = Annotated[
    Format,
    WithJsonSchema(
        {
            "type": "string",
            "pattern": FORMAT_PATTERN,
            "description": "fp32, bf16, fp16, fp8-e4m3, int{b}[-g{G}][-asym] or a llama.cpp "
            "block format (q8_0, q4_k, ...)",
            "examples": ["int4-g128"],
        }
    ),
]


def _spec_field(name: str, **schema_extra: Any) -> Any:
    """A copy of :class:`JobSpec`'s field ``name``: its default, bounds and description, so the
    request restates none of them (pydantic takes a FieldInfo as a field's default);
    ``schema_extra`` adds JSON Schema keywords that the request's validators enforce."""
    field = copy(JobSpec.model_fields[name])
    if schema_extra:
        field.json_schema_extra = schema_extra
    return field


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
        json_schema_extra={"pattern": _MODEL_REF_PATTERN},  # enforced by _check_model
    )
    calib: str = Field(
        BUILTIN_CALIB,
        min_length=1,
        max_length=_MAX_REF_LENGTH,
        description="the id of an uploaded dataset, or 'builtin' for the model's builtin data",
        json_schema_extra={"pattern": _CALIB_REF_PATTERN},  # enforced by _check_calib
    )
    budget: str = _spec_field("budget", pattern=BUDGET_PATTERN)
    # uniqueItems: parse_formats refuses a format listed twice.
    formats: list[RequestFormat] = _spec_field("formats", uniqueItems=True)
    rounding: list[Rounding] = _spec_field("rounding", uniqueItems=True)  # JobSpec refuses repeats
    method: Method = _spec_field("method")
    task: Task | None = _spec_field("task")
    trials: int = _spec_field("trials")
    timeout: float | None = _spec_field("timeout")
    seed: int = _spec_field("seed")
    sampler: Sampler = _spec_field("sampler")
    exclude: list[str] = _spec_field("exclude")
    pins: dict[str, RequestFormat] = _spec_field("pins")
    fuse: list[FuseRule] = _spec_field("fuse", uniqueItems=True)  # JobSpec refuses repeats
    holdout: float = _spec_field("holdout")
    max_length: int = _spec_field("max_length")
    max_samples: int | None = _spec_field("max_samples")

    @field_validator(
        "trials", "timeout", "seed", "holdout", "max_length", "max_samples", mode="before"
    )
    @classmethod
    def _check_number(cls, value: Any) -> Any:
        # The schema says these are JSON numbers; pydantic's lax mode would also read "seed":
        # false as 0 and "trials": "40" as 40. (Strict mode would refuse 40.0, an integer in
        # JSON Schema's terms.)
        if isinstance(value, bool | str):
            raise ValueError(f"must be a JSON number, got {value!r}")
        return value

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        name = value.removeprefix(BUILTIN_PREFIX)
        accepted = ", ".join(_BUILTIN_MODEL_REFS)
        if name != value and name not in BUILTIN_MODELS:
            raise ValueError(f"unknown builtin model {value!r}; accepted: {accepted}")
        if name == value and _ID_RE.fullmatch(value) is None:
            raise ValueError(
                f"{value!r} is no model id (ids look like {_ID_EXAMPLE}); upload the model "
                f"with POST /v1/models, or use a builtin: {accepted}"
            )
        return value

    @field_validator("calib")
    @classmethod
    def _check_calib(cls, value: str) -> str:
        if value != BUILTIN_CALIB and _ID_RE.fullmatch(value) is None:
            raise ValueError(
                f"{value!r} is no dataset id (ids look like {_ID_EXAMPLE}); upload the data "
                f"with POST /v1/datasets, or use {BUILTIN_CALIB!r}"
            )
        return value

    @field_validator("formats")
    @classmethod
    def _check_formats(cls, value: list[QuantFormat]) -> list[QuantFormat]:
        return parse_formats(value)  # the library's parser: a format listed twice is refused

    @field_validator("budget")
    @classmethod
    def _check_budget(cls, value: str) -> str:
        parse_budget(value)  # InputError is a ValueError: pydantic reports it as a field error
        if _BUDGET_RE.fullmatch(value) is None:
            raise ValueError(
                f"budget {value!r} is outside the API's budget syntax: <bits>bpw (at most 32), "
                "<fraction>x, or <size><unit> of at least 1 B (0.001 of a larger unit), "
                "without spaces around it"
            )
        return value

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


class JobRequestRead(JobCreate):
    """A job's request as submitted; ``model``/``calib`` read ``deleted`` once the upload they
    named is deleted."""

    model: str = Field(
        description="the uploaded model's id, a builtin such as 'builtin:digits-cnn', or 'deleted'"
    )
    calib: str = Field(description="the uploaded dataset's id, 'builtin', or 'deleted'")
    # Jobs submitted before the API took only BUDGET_PATTERN's spellings show theirs as stored.
    budget: str = Field(description="the budget as submitted: 4.5bpw, 60MB, 58MiB or 0.3x")


class StageRead(BaseModel):
    """What one stage of a finished job cost (:mod:`bitplan.search.stage_stats`)."""

    stage: str = Field(description="the stage's name, as 'stage' showed it while it ran")
    seconds: float = Field(ge=0, description="wall-clock seconds spent in the stage")
    peak_rss_bytes: int | None = Field(
        ge=0,
        description="the worker process's peak resident memory during the stage, sampled every "
        "50 ms; null where the platform does not say",
    )
    peak_gpu_bytes: int | None = Field(
        None,
        ge=0,
        description="the CUDA memory the stage's tensors peaked at (torch's allocator); null for "
        "a stage that ran without CUDA, and for jobs recorded before this was measured",
    )
    forward_equivalents: float | None = Field(
        ge=0,
        description="samples the model forwarded during the stage, in passes over the "
        "calibration split (held-out passes count in the same unit; backward passes do not); "
        "null when not counted",
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
    request: JobRequestRead = Field(description="the request as submitted")
    plans: list[str] = Field(
        description="ids of the job's plans (frontier points and uniform baselines; "
        "'best' is an alias of one of them), once the job succeeded"
    )
    stages: list[StageRead] = Field(
        default_factory=list,
        description="what each stage cost, in the order they ran, once the job succeeded "
        "(empty before, and for jobs finished before the service recorded it)",
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


class ModelExportRead(BaseModel):
    """A model export on its way: one plan of a job applied to the job's model for a runtime
    target, queued or being written by a worker (the body of a ``202`` of ``GET
    /v1/jobs/{id}/plans/{plan_id}/model``; the same URL answers the file once it is ready)."""

    job_id: str = Field(description="the job whose plan is exported")
    plan_id: str = Field(description="the plan")
    target: str = Field(description="the runtime target (as `bitplan apply --to`)")
    state: Literal[JobState.QUEUED, JobState.RUNNING] = Field(
        description="queued (waiting for a worker) or running"
    )
    stage: str = Field(description="'queued', 'starting', 'export' (writing), 'package'")
    progress: float = Field(ge=0, le=1, description="fraction of the export done, 0 to 1")
    eta_s: float | None = Field(description="estimated seconds left; null when unknown")
    attempts: int = Field(ge=0, description="how many times a worker has claimed the export")
    links: dict[str, str] = Field(description="self: this URL, which serves the file when ready")


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
