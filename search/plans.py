"""Plan files (``bitplan.plan/v1``) and frontier files (``bitplan.frontier/v1``), DESIGN §4.

A plan is the product a user downloads: one format per layer plus the byte totals that the
packed artifact must match. Totals are never trusted from a caller or a file: :func:`make_plan`
derives them from the byte rules, and reading a plan recomputes them and rejects a file whose
totals disagree. The rules: a tie group's tensor counts once (every member lists the shared
tensor's bytes, the totals count it once); ``bpw = 8 · planned_bytes / planned_numel`` with a
tie group's numel counted once; ``total_bytes = planned_bytes + unplanned_bytes``;
``ratio_vs_fp16 = total_bytes / fp16_bytes``.

A layer's ``group`` (absent in older plans, read as null) names its share group: separate
tensors that must take one format, e.g. q/k/v a runtime fuses (DESIGN §6). Each member keeps
its own bytes; a plan whose share-group (or tie-group) members differ in format is refused.

Plan ids in a frontier file are ``{bpw:.2f}bpw-{digest}`` with a digest of the plan's layer
formats (:func:`plan_id_of`: one plan, one id, in ``solve``, ``search`` and the API) and
``u-{format}`` for the uniform-format reference points; both are valid file names and URL
segments. ``plans/best.json`` is a copy of the best plan under the budget.

The documents are pydantic models that validate themselves, and import neither torch nor pandas,
so the REST API can use them as response models.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Final, Literal, TypeVar, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    model_validator,
)
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

from bitplan.search.budgets import Budget
from bitplan.search.budgets import BudgetDict as PlanBudget
from bitplan.search.fields import Format, Rounding
from bitplan.search.points import Choice, choice_names
from bitplan.search.spec import validation_message
from bitplan.sensitivity.atomic import write_text_atomic
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.format_spec import QuantFormat, parse_format, tensor_bytes

if TYPE_CHECKING:  # make_plan imports them when called: reading a plan needs no torch
    from bitplan.search.problem import LayerRow
    from bitplan.sensitivity.layers import QuantLayer

__all__ = [
    "BEST_PLAN_ID",
    "FRONTIER_SCHEMA",
    "PLAN_ID_PATTERN",
    "PLAN_SCHEMA",
    "SCOPE_END_TO_END",
    "SCOPE_PROXY",
    "SCOPE_STREAMED",
    "SOURCES",
    "FrontierFile",
    "FrontierPoint",
    "ModelRef",
    "Plan",
    "PlanBudget",
    "PlanLayer",
    "PlanTotals",
    "make_plan",
    "metrics_scope",
    "plan_id_of",
    "read_frontier",
    "read_plan",
    "write_frontier",
]

PLAN_SCHEMA: Final = "bitplan.plan/v1"
FRONTIER_SCHEMA: Final = "bitplan.frontier/v1"
SOURCES = ("exact", "search", "uniform")
# Float totals are recomputed from integers, so only float rounding can differ; 1e-12 relative
# is far above that (1e-16) and at most one byte in a terabyte, below any real inconsistency.
_REL_TOL = 1e-12
# The plan-file name, under plans/, of the best plan under the budget (a copy of that plan).
BEST_PLAN_ID = "best"
# Plan ids name files under plans/ and URL segments: no path separator, no leading dot.
PLAN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# What a plan's figures measure: the optional ``scope`` entry of its ``metrics`` and of a
# frontier file. The predicted error is the additive proxy; the calibration and held-out
# figures ran the whole network, loaded whole or streamed one transformer block at a time
# from disk (a model larger than memory: :mod:`bitplan.search.blockwise_eval`).
SCOPE_PROXY = "proxy: sum of per-layer sensitivities"
SCOPE_END_TO_END = "end-to-end"
SCOPE_STREAMED = "end-to-end, streamed block by block"


class ModelRef(TypedDict):
    """Which model a plan is for: what the user named and the SHA-256 of its weights."""

    ref: Annotated[str, Field(description="the model as the user named it")]
    sha256: Annotated[str, Field(description="SHA-256 of the model's weights")]


class _Contract(BaseModel):
    """A part of a file contract: frozen, and unknown fields are an error, not silently lost."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class PlanLayer(_Contract):
    """One layer of a plan; ``bits``/``group_size``/``symmetric`` repeat the format so that
    consumers need no parser. ``kind``/``shape`` are None for plans solved from a bare table.

    The share group is written as ``group`` (the user table's column name, DESIGN §6) and read
    as :attr:`share`, because :attr:`group` is the unit the plan decides on.
    """

    name: str
    param: str
    kind: str | None
    shape: tuple[int, int] | None
    numel: int = Field(ge=0)
    tie: str | None
    share: str | None = Field(
        None,
        alias="group",
        min_length=1,
        description="the share group (tensors that take one format), or null",
    )
    format: Format
    rounding: Rounding = "rtn"
    bits: int
    group_size: int | None
    symmetric: bool
    bytes: int = Field(ge=0)

    @model_validator(mode="before")
    @classmethod
    def _join_rounding(cls, data: Any) -> Any:
        """The file has ``format`` and ``rounding`` apart; the model holds one option (a
        :class:`QuantFormat` with its rounding). A parsed option brings its own rounding."""
        if not isinstance(data, Mapping):
            return data
        fmt, rounding = data.get("format"), data.get("rounding")
        if isinstance(fmt, QuantFormat):
            return {**data, "rounding": fmt.rounding}
        if isinstance(fmt, str) and isinstance(rounding, str) and "+" not in fmt:
            try:
                joined = parse_format(fmt).with_rounding(rounding).name
            except InputError:
                return data  # the field validators name the bad value
            return {**data, "format": joined}
        return data

    @field_serializer("format")
    def _storage_format(self, fmt: QuantFormat) -> str:
        return fmt.base_name

    @property
    def tensor_key(self) -> str:
        """The stored tensor: the tie group, or the layer itself (bytes count once per key)."""
        return self.tie or self.name

    @property
    def group(self) -> str:
        """The unit the plan decides on: the share group, else the tie group, else the layer."""
        return self.share or self.tensor_key

    @model_validator(mode="after")
    def _consistent(self) -> PlanLayer:
        fmt = self.format
        if fmt.rounding != self.rounding:
            raise ValueError(
                f"layer {self.name}: format {fmt.name} and rounding {self.rounding} disagree"
            )
        if (self.bits, self.group_size, self.symmetric) != (
            fmt.bits,
            fmt.group_size,
            fmt.symmetric,
        ):
            raise ValueError(
                f"layer {self.name}: bits/group_size/symmetric do not match format {fmt.name}"
            )
        if self.shape is not None and self.bytes != tensor_bytes(fmt, *self.shape):
            raise ValueError(
                f"layer {self.name}: {self.bytes} bytes, but a {list(self.shape)} "
                f"matrix in {fmt.name} takes {tensor_bytes(fmt, *self.shape)}"
            )
        return self


class PlanTotals(_Contract):
    planned_bytes: int
    unplanned_bytes: int = Field(ge=0)
    total_bytes: int
    bpw: float
    fp16_bytes: int = Field(ge=0)
    ratio_vs_fp16: float


def _totals(layers: Sequence[PlanLayer], *, unplanned_bytes: int, fp16_bytes: int) -> PlanTotals:
    """Totals by the byte rules (module docstring): each tie group's tensor once."""
    once = {lay.tensor_key: lay for lay in layers}.values()
    planned = sum(lay.bytes for lay in once)
    numel = sum(lay.numel for lay in once)
    total = planned + unplanned_bytes
    return PlanTotals(
        planned_bytes=planned,
        unplanned_bytes=unplanned_bytes,
        total_bytes=total,
        bpw=8 * planned / numel if numel else 0.0,
        fp16_bytes=fp16_bytes,
        ratio_vs_fp16=total / fp16_bytes if fp16_bytes else 0.0,
    )


class _Doc(_Contract):
    """A whole versioned document: ``schema`` first, written with its own name."""

    SCHEMA: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (formats as names, ``schema`` under its own name)."""
        return self.model_dump(mode="json", by_alias=True)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"


_D = TypeVar("_D", bound=_Doc)


def _from_json(cls: type[_D], data: object, what: str) -> _D:
    """Validate a parsed JSON document; any problem is one InputError line naming the field."""
    if not isinstance(data, Mapping):
        raise InputError(f"a {what} must be a JSON object with schema {cls.SCHEMA}")
    if data.get("schema") != cls.SCHEMA:
        raise InputError(
            f"unsupported {what} schema {data.get('schema')!r}; this bitplan reads {cls.SCHEMA}"
        )
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise InputError(
            f"{what}: {validation_message(exc)}; see the {cls.SCHEMA} layout"
        ) from None


class Plan(_Doc):
    """A ``bitplan.plan/v1`` document. Build with :func:`make_plan`, load with :func:`read_plan`.

    Validating one recomputes its totals from its layers and rejects any disagreement, checks
    every layer's bytes against its shape and format, and that a tie or share group has one
    format (and a tied tensor one share group).
    ``metrics`` holds ``predicted_error`` and the ``calibration``/``holdout`` measurements,
    and, in plans of a job, ``scope``: what each of them measures (:func:`metrics_scope`).
    """

    SCHEMA: ClassVar[str] = PLAN_SCHEMA

    schema_: Literal["bitplan.plan/v1"] = Field(default=PLAN_SCHEMA, alias="schema")
    model: ModelRef
    budget: PlanBudget | None
    layers: list[PlanLayer] = Field(min_length=1)
    totals: PlanTotals
    metrics: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        first: dict[str, PlanLayer] = {}
        for lay in self.layers:
            other = first.setdefault(lay.group, lay)
            if other.format != lay.format:
                what, why = (
                    ("share group", "its layers must take one format")
                    if lay.share
                    else ("tie group", "tied layers share one tensor")
                )
                raise ValueError(
                    f"{what} {lay.group} has two formats ({other.name}: {other.format.name}, "
                    f"{lay.name}: {lay.format.name}); {why}"
                )
        decided: dict[str, PlanLayer] = {}
        for lay in self.layers:
            other = decided.setdefault(lay.tensor_key, lay)
            if other.group != lay.group:
                raise ValueError(
                    f"tie group {lay.tensor_key} is split across groups ({other.name} in "
                    f"{other.group}, {lay.name} in {lay.group}); tied layers share one tensor"
                )
        t = self.totals
        want = _totals(self.layers, unplanned_bytes=t.unplanned_bytes, fp16_bytes=t.fp16_bytes)
        for name in ("planned_bytes", "total_bytes", "bpw", "ratio_vs_fp16"):
            got, expected = getattr(t, name), getattr(want, name)
            if not math.isclose(got, expected, rel_tol=_REL_TOL, abs_tol=0.0):
                raise ValueError(f"totals.{name} is {got} but its layers give {expected}")
        for key in ("calibration", "holdout"):
            self.metrics.setdefault(key, {})
        self.metrics.setdefault("predicted_error", None)
        return self

    @property
    def model_ref(self) -> str:
        return self.model["ref"]

    @property
    def model_sha256(self) -> str:
        return self.model["sha256"]

    @property
    def predicted_error(self) -> float | None:
        value = self.metrics.get("predicted_error")
        return None if value is None else float(value)

    def choice(self) -> dict[str, QuantFormat]:
        """``{group: format}``, the form the search and the applier work with."""
        return {lay.group: lay.format for lay in self.layers}

    @classmethod
    def from_dict(cls, data: object) -> Plan:
        """Parse and validate; any inconsistency is an InputError naming the field."""
        return _from_json(cls, data, "plan")

    def write(self, path: Path | str) -> Path:
        path = Path(path)
        write_text_atomic(path, self.to_json())
        return path


def read_plan(path: Path | str) -> Plan:
    """Load and validate a plan file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"plan file {path} does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"plan file {path} is not JSON ({exc})") from exc
    return Plan.from_dict(data)


def metrics_scope(*, streamed: bool) -> dict[str, str]:
    """The ``scope`` of a job's figures: which of a plan's metrics are end-to-end."""
    measured = SCOPE_STREAMED if streamed else SCOPE_END_TO_END
    return {"predicted_error": SCOPE_PROXY, "calibration": measured, "holdout": measured}


def make_plan(
    *,
    model_ref: str,
    model_sha256: str,
    layers: Sequence[QuantLayer | LayerRow],
    choice: Choice,
    budget: Budget | None,
    unplanned_bytes: int,
    fp16_bytes: int,
    predicted_error: float | None,
    metrics: Mapping[str, Any] | None = None,
) -> Plan:
    """A plan assigning ``choice[group]`` to every layer, with totals from the byte rules.

    ``choice`` maps each group (share group, tie group or layer name) to a format; ``metrics``
    may hold ``calibration`` and ``holdout`` dicts of measured metrics.
    """
    from bitplan.search.problem import as_layer_rows

    rows = as_layer_rows(layers)
    missing = sorted({r.group for r in rows} - set(choice))
    if missing:
        raise InputError(f"the choice gives no format for {', '.join(missing[:3])}")
    unknown = sorted(set(choice) - {r.group for r in rows})
    if unknown:
        raise InputError(
            f"the choice names groups the plan does not have: {', '.join(unknown[:3])}"
        )
    plan_layers = [_plan_layer(r, choice[r.group]) for r in rows]
    totals = _totals(plan_layers, unplanned_bytes=unplanned_bytes, fp16_bytes=fp16_bytes)
    return Plan(
        model=ModelRef(ref=model_ref, sha256=model_sha256),
        budget=budget.to_dict() if budget is not None else None,
        layers=plan_layers,
        totals=totals,
        metrics={
            "predicted_error": predicted_error,
            "calibration": {},
            "holdout": {},
            **(metrics or {}),
        },
    )


def _plan_layer(row: LayerRow, fmt: QuantFormat) -> PlanLayer:
    return PlanLayer(
        name=row.name,
        param=row.param,
        kind=row.kind,
        shape=row.shape,
        numel=row.numel,
        tie=row.tie,
        group=row.share,
        format=fmt,
        rounding=cast(Rounding, fmt.rounding),
        bits=fmt.bits,
        group_size=fmt.group_size,
        symmetric=fmt.symmetric,
        bytes=row.bytes_for(fmt),
    )


def plan_id_of(plan: Plan) -> str:
    """The id of a frontier plan: ``{bpw:.2f}bpw-{digest}``, from the plan's content alone.

    The digest is the first 8 hex digits of the SHA-256 of its ``group=format`` lines (sorted),
    so one plan has one id wherever it is found (``solve``, ``search``, a frontier file, the
    API) and the id does not move when a search finds other plans; the bpw prefix says the size
    at a glance. Uniform reference plans are named ``u-{format}`` instead (see
    :func:`write_frontier`).
    """
    names = choice_names(plan.choice())
    lines = "\n".join(f"{group}={fmt}" for group, fmt in sorted(names.items()))
    digest = hashlib.sha256(lines.encode()).hexdigest()[:8]
    return f"{plan.totals.bpw:.2f}bpw-{digest}"


class FrontierPoint(_Contract):
    """One point of a frontier: a plan's size, its predicted and measured errors, where its plan
    file is (``plan``, relative to the frontier file) and how it was found (``source``:
    ``exact`` for the proxy frontier, ``search`` for the measured search, ``uniform:<format>``
    for a reference plan). The one point type of frontier files, job results and the API; the
    algorithms' own is :class:`~bitplan.search.points.Point` (that module says why there are
    two), which :func:`bitplan.search.outputs.publish` turns into this one."""

    plan_id: str = Field(
        pattern=PLAN_ID_PATTERN,
        description="the plan's id, '{bpw}bpw-{hash of the per-layer formats}' or 'u-{format}'",
    )
    total_bytes: int = Field(
        ge=0, description="size of the quantized model in bytes, all parameters"
    )
    bpw: float = Field(ge=0, description="bits per planned weight")
    predicted_error: float | None = Field(
        description="the additive sensitivity model's error estimate; null when not predicted"
    )
    metrics: dict[str, dict[str, float]] = Field(
        description="measured quality on the 'calibration' split and the held-out 'holdout' split"
    )
    plan: str = Field(description="the plan file, relative to the frontier file")
    source: str = Field(
        description="how the point was found: 'exact', 'search' or 'uniform:<format>'"
    )

    @model_validator(mode="after")
    def _known_source(self) -> FrontierPoint:
        if self.source.split(":")[0] not in SOURCES:
            raise ValueError(f"unknown point source {self.source!r}; expected one of {SOURCES}")
        return self

    @property
    def calibration(self) -> dict[str, float]:
        """Metrics measured on the calibration split (what the search saw)."""
        return self.metrics.get("calibration", {})

    @property
    def holdout(self) -> dict[str, float]:
        """Metrics measured on the held-out split (what the frontier reports)."""
        return self.metrics.get("holdout", {})

    @classmethod
    def of(cls, plan: Plan, *, plan_id: str, source: str) -> FrontierPoint:
        return cls(
            plan_id=plan_id,
            total_bytes=plan.totals.total_bytes,
            bpw=plan.totals.bpw,
            predicted_error=plan.predicted_error,
            metrics={
                "calibration": dict(plan.metrics.get("calibration") or {}),
                "holdout": dict(plan.metrics.get("holdout") or {}),
            },
            plan=f"plans/{plan_id}.json",
            source=source,
        )


class FrontierFile(_Doc):
    """A ``bitplan.frontier/v1`` document: measured points (smallest first) and uniform
    reference points. Not frozen: readers may re-sort or filter the lists."""

    model_config = ConfigDict(frozen=False, extra="forbid")
    SCHEMA: ClassVar[str] = FRONTIER_SCHEMA

    schema_: Literal["bitplan.frontier/v1"] = Field(
        default=FRONTIER_SCHEMA, alias="schema", description="'bitplan.frontier/v1'"
    )
    model: ModelRef = Field(description="the model: 'ref' and its 'sha256'")
    budget: PlanBudget | None = Field(
        description="the requested budget ('kind': bpw, bytes or ratio, and 'value'); null if none"
    )
    points: list[FrontierPoint] = Field(description="the frontier, smallest first")
    uniform: list[FrontierPoint] = Field(
        default_factory=list, description="uniform-format reference points"
    )
    scope: dict[str, str] | None = Field(
        default=None,
        description="what each figure measures: 'predicted_error' the proxy (a sum of "
        "per-layer sensitivities); 'calibration' and 'holdout' 'end-to-end', or 'end-to-end, "
        "streamed block by block' for a model run one block at a time; null when not stated",
    )

    @classmethod
    def from_dict(cls, data: object) -> FrontierFile:
        """Parse and validate; any problem is an InputError naming the field."""
        return _from_json(cls, data, "frontier file")

    def csv_text(self) -> str:
        """One row a point (uniform points too, told apart by ``source``)."""
        points = self.points + self.uniform
        keys = {
            split: sorted({k for p in points for k in p.metrics.get(split, {})})
            for split in ("calibration", "holdout")
        }
        header = ["plan_id", "source", "total_bytes", "bpw", "predicted_error"]
        header += [f"{split}_{k}" for split, names in keys.items() for k in names] + ["plan"]
        lines = [",".join(header)]
        for p in points:
            cells: list[object] = [p.plan_id, p.source, p.total_bytes, p.bpw, p.predicted_error]
            cells += [
                p.metrics.get(split, {}).get(k) for split, names in keys.items() for k in names
            ]
            lines.append(",".join("" if c is None else str(c) for c in [*cells, p.plan]))
        return "\n".join(lines) + "\n"


def _uniform_id(plan: Plan, source: str) -> str:
    # Named after the format asked for (``uniform:<format>``): layers it does not fit (a
    # llama.cpp block format, see format_spec.applicable_format) hold a fallback, and two asked
    # formats may share one. Else after the commonest format (the unpinned layers share one).
    # A rounding joins with "-" (u-int4-g128-gptq): plan ids are file names and URL segments.
    asked = source.removeprefix("uniform:")
    if asked != source:
        return f"u-{asked.replace('+', '-')}"
    names = [lay.format.name for lay in plan.layers]
    return f"u-{max(names, key=names.count).replace('+', '-')}"


def write_frontier(
    out_dir: Path | str,
    *,
    model_ref: str,
    model_sha256: str,
    budget: Budget | None,
    points: Sequence[tuple[Plan, str]],
    uniform: Sequence[tuple[Plan, str]] = (),
    best: Plan | None = None,
    scope: Mapping[str, str] | None = None,
) -> FrontierFile:
    """Write ``plans/<plan_id>.json`` for every point, ``frontier.json`` and ``frontier.csv``.

    ``points`` and ``uniform`` are ``(plan, source)`` pairs; points are listed by total bytes
    and named by :func:`plan_id_of`, uniform points after their format. ``best`` (one of the
    points' plans: the answer to the budget) is also written as ``plans/best.json``, a handle
    that works whatever plans a run found. Exactly the listed points' plans are written, and
    plan files of an earlier run in the same folder are removed. ``scope`` says what the
    figures measure (:func:`metrics_scope`).
    """
    out = Path(out_dir)
    ranked = sorted(points, key=lambda pair: pair[0].totals.total_bytes)
    entries = [
        FrontierPoint.of(plan, plan_id=plan_id_of(plan), source=source) for plan, source in ranked
    ]
    refs = [
        FrontierPoint.of(plan, plan_id=_uniform_id(plan, src), source=src) for plan, src in uniform
    ]
    ids = [e.plan_id for e in entries + refs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"two frontier points would share a plan id: {sorted(ids)}")
    if best is not None and not any(best is plan for plan, _ in points):
        raise ValueError("the best plan must be one of the frontier's points")
    for entry, (plan, _) in zip(entries + refs, [*ranked, *uniform], strict=True):
        plan.write(out / entry.plan)
    if best is not None:
        best.write(out / "plans" / f"{BEST_PLAN_ID}.json")
    # Only once this run's plans are written: a reused folder keeps no earlier run's plans.
    for stale in (out / "plans").glob("*.json"):
        if stale.stem not in {*ids, BEST_PLAN_ID}:
            stale.unlink()
    result = FrontierFile(
        model=ModelRef(ref=model_ref, sha256=model_sha256),
        budget=budget.to_dict() if budget is not None else None,
        points=entries,
        uniform=refs,
        scope=dict(scope) if scope is not None else None,
    )
    write_text_atomic(out / "frontier.json", result.to_json())
    write_text_atomic(out / "frontier.csv", result.csv_text())
    return result


def read_frontier(path: Path | str) -> FrontierFile:
    """Load and validate a ``frontier.json``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"frontier file {path} does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"frontier file {path} is not JSON ({exc})") from exc
    return FrontierFile.from_dict(data)
