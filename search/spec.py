"""What one job asks for: the request shared by the CLI, the REST and Python APIs and the worker.

A :class:`JobSpec` is a frozen pydantic model: plain data that a job row stores
(:meth:`JobSpec.to_dict`) and a worker on another machine rebuilds unchanged
(``JobSpec(**spec.to_dict())``). It is the one place the job defaults are written; read them
from ``JobSpec.model_fields[name]`` (``.get_default(call_default_factory=True)``). Formats are
parsed once into :class:`~bitplan.sensitivity.format_spec.QuantFormat` and written back as names.

Bad values raise :class:`~bitplan.sensitivity.errors.InputError` with one line naming the field
(the CLI turns it into exit code 2), not pydantic's multi-line ``ValidationError``. Importing this
module imports neither torch nor pandas nor Optuna: the CLI reads the defaults at start-up.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bitplan.search.budgets import parse_budget
from bitplan.search.fields import Format, Rounding
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.format_spec import DEFAULT_FORMATS, ROUNDINGS, QuantFormat, parse_formats
from bitplan.sensitivity.fusion import FUSE_RULES, FuseRule, check_fuse_rules
from bitplan.sensitivity.method_names import METHODS

__all__ = [
    "ANALYZE_BUDGET",
    "METHODS",
    "SAMPLERS",
    "FuseRule",
    "JobSpec",
    "validation_message",
]

# The samplers :func:`bitplan.search.measured.measured_search` knows (it imports this list); defined
# here so that validating a request does not import Optuna.
SAMPLERS = ("nsga2", "tpe")
# `analyze` measures sensitivities only, but a JobSpec needs a budget: 16 bpw (fp16 everywhere)
# always fits.
ANALYZE_BUDGET = "16bpw"
# Upper bounds of the numeric fields: far beyond any useful job, low enough that a request can
# neither hold a worker for ages (each trial is a measured evaluation) nor overflow a seed.
MAX_TRIALS = 10_000
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a week
MAX_SEED = 2**32 - 1  # numpy and Optuna seeds are unsigned 32-bit
MAX_LENGTH_TOKENS = 1 << 20
MAX_SAMPLES = 10_000_000
MAX_BATCH_SIZE = 65_536
MAX_PATTERNS = 1024  # exclude patterns or pins; a model has fewer distinct layer groups
MAX_NAME_LENGTH = 255  # a file name, as the service stores it
_DEFAULT_ROUNDING: tuple[Rounding, ...] = ("rtn",)  # round to nearest: what runtimes do alone


def validation_message(exc: ValidationError) -> str:
    """One line from a pydantic error: ``field: why`` for each problem, ``; ``-joined.

    A validator that raised :class:`InputError` (or any ValueError) keeps its own message, which
    already names the value and what is accepted.
    """
    parts = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(part) for part in err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        why = str(cause) if isinstance(cause, ValueError) else err["msg"]
        if err["type"] not in ("value_error", "missing", "extra_forbidden"):
            why += f", got {err['input']!r}"
        parts.append(f"{field}: {why}" if field else why)
    return "; ".join(parts)


class JobSpec(BaseModel):
    """One planning request. ``calib`` is ``builtin`` or a data file path; ``budget`` uses the
    syntax of DESIGN §5 (``4.5bpw``, ``60MB``, ``0.3x``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(min_length=1, description="builtin:<name>, a model folder, zip or file")
    budget: str = Field(
        min_length=1, max_length=64, description="4.5bpw, 60MB, 58MiB or 0.3x (DESIGN §5)"
    )
    calib: str = Field("builtin", min_length=1, description="'builtin' or a data file path")
    # The service opens uploads by their stored path, which no user should see: it names them
    # here by the uploaded file's name for plans, the frontier, the report and error messages.
    model_name: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        description="how results and errors name the model (default: 'model' as given)",
    )
    calib_name: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        description="how errors name the calibration data (default: 'calib' as given)",
    )
    formats: list[Format] = Field(
        default_factory=lambda: parse_formats(DEFAULT_FORMATS),
        min_length=1,
        description="the formats a layer may take",
    )
    rounding: list[Rounding] = Field(
        default_factory=lambda: list(_DEFAULT_ROUNDING),
        min_length=1,
        max_length=len(ROUNDINGS),
        description="how int formats may be rounded (each a planning option of the same bytes): "
        "rtn (nearest), gptq and awq (from the calibration inputs), hqq (data-free)",
    )
    method: str = Field("fisher", description="sensitivity method: " + ", ".join(METHODS))
    task: str | None = Field(None, description="model task; None infers it from the model")
    trials: int = Field(
        40, ge=1, le=MAX_TRIALS, description="measured-search trials, seeds included"
    )
    timeout: float | None = Field(
        None, gt=0, le=MAX_TIMEOUT_S, description="seconds for the measured search"
    )
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="seeds the data split, the sensitivity and the search"
    )
    sampler: str = Field("nsga2", description="Optuna sampler: " + ", ".join(SAMPLERS))
    exclude: list[str] = Field(
        default_factory=list, max_length=MAX_PATTERNS, description="fnmatch patterns left unplanned"
    )
    pins: dict[str, Format] = Field(
        default_factory=dict,
        max_length=MAX_PATTERNS,
        description="layer pattern -> the format it must take",
    )
    fuse: list[FuseRule] = Field(
        default_factory=list,
        max_length=len(FUSE_RULES),  # each rule at most once, so the schema's bound is exact
        description="fusion rules whose layers take one format: " + ", ".join(FUSE_RULES),
    )
    holdout: float = Field(0.25, gt=0, lt=1, description="share of the data held out")
    max_length: int = Field(
        128, ge=1, le=MAX_LENGTH_TOKENS, description="tokens a text sample is cut to"
    )
    max_samples: int | None = Field(
        None, ge=1, le=MAX_SAMPLES, description="calibration samples to use at most"
    )
    batch_size: int = Field(32, ge=1, le=MAX_BATCH_SIZE, description="samples a forward pass")
    # The model loader checks the name (it owns the list of devices, and torch).
    device: str = Field("auto", description="auto, cpu or cuda")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InputError(validation_message(exc)) from None

    @field_validator("budget")
    @classmethod
    def _check_budget(cls, value: str) -> str:
        return parse_budget(value).text  # the text as written, stripped

    @field_validator("method")
    @classmethod
    def _check_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; accepted: {', '.join(METHODS)}")
        return value

    @field_validator("sampler")
    @classmethod
    def _check_sampler(cls, value: str) -> str:
        if value not in SAMPLERS:
            raise ValueError(f"unknown sampler {value!r}; accepted: {', '.join(SAMPLERS)}")
        return value

    @field_validator("fuse")
    @classmethod
    def _check_fuse(cls, value: list[FuseRule]) -> list[FuseRule]:
        return check_fuse_rules(value)  # a rule listed twice is an error

    @field_validator("formats")
    @classmethod
    def _check_formats(cls, value: list[QuantFormat]) -> list[QuantFormat]:
        return parse_formats(value)  # rejects a format listed twice

    @field_validator("rounding")
    @classmethod
    def _check_rounding(cls, value: list[str]) -> list[str]:
        twice = sorted({r for r in value if value.count(r) > 1})
        if twice:
            raise ValueError(f"rounding listed twice: {', '.join(twice)}")
        return value

    @property
    def options(self) -> list[QuantFormat]:
        """The planning options: every int format once per rounding, other formats as they are
        (they round to nearest only)."""
        out: list[QuantFormat] = []
        for fmt in self.formats:
            if fmt.kind == "int":
                out += [fmt.with_rounding(r) for r in self.rounding]
            else:
                out.append(fmt)
        return list(dict.fromkeys(out))

    @property
    def format_names(self) -> list[str]:
        """The formats' canonical names, in order."""
        return [fmt.name for fmt in self.formats]

    def pin_names(self) -> dict[str, str]:
        """``{pattern: format name}``, the form the model loader takes."""
        return {pattern: fmt.name for pattern, fmt in self.pins.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (formats as names); ``JobSpec(**spec.to_dict())`` rebuilds it."""
        return self.model_dump(mode="json")
