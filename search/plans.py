"""Plan files (``bitplan.plan/v1``) and frontier files (``bitplan.frontier/v1``), DESIGN §4.

A plan is the product a user downloads: one format per layer plus the byte totals that the
packed artifact must match. Totals are never trusted from a caller or a file: :func:`make_plan`
derives them from the byte rules, and reading a plan recomputes them and rejects a file whose
totals disagree. The rules: a tie group's tensor counts once (every member lists the shared
tensor's bytes, the totals count it once); ``bpw = 8 · planned_bytes / planned_numel`` with a
tie group's numel counted once; ``total_bytes = planned_bytes + unplanned_bytes``;
``ratio_vs_fp16 = total_bytes / fp16_bytes``.

Plan ids in a frontier file are ``p{rank:03d}-{bpw:.2f}bpw`` (rank by total bytes, smallest
first, so ids sort like the frontier and say the size at a glance) and ``u-{format}`` for the
uniform-format reference points; both are valid file names and URL segments.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bitplan.search.budgets import Budget
from bitplan.search.problem import LayerRow, as_layer_rows
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import parse_format, tensor_bytes
from bitplan.sensitivity.layers import QuantLayer

__all__ = [
    "FRONTIER_SCHEMA",
    "PLAN_SCHEMA",
    "FrontierFile",
    "FrontierPoint",
    "Plan",
    "PlanLayer",
    "PlanTotals",
    "make_plan",
    "read_frontier",
    "SOURCES",
    "read_plan",
    "write_frontier",
]

PLAN_SCHEMA = "bitplan.plan/v1"
FRONTIER_SCHEMA = "bitplan.frontier/v1"
SOURCES = ("exact", "search", "uniform")
# Float totals are recomputed from integers, so only float rounding can differ; 1e-12 relative
# is far above that (1e-16) and at most one byte in a terabyte, below any real inconsistency.
_REL_TOL = 1e-12


@dataclass(frozen=True)
class PlanLayer:
    """One layer of a plan; ``bits``/``group_size``/``symmetric`` repeat the format so that
    consumers need no parser. ``kind``/``shape`` are None for plans solved from a bare table."""

    name: str
    param: str
    kind: str | None
    shape: tuple[int, int] | None
    numel: int
    tie: str | None
    format: str
    bits: int
    group_size: int | None
    symmetric: bool
    bytes: int

    @property
    def group(self) -> str:
        return self.tie or self.name


@dataclass(frozen=True)
class PlanTotals:
    planned_bytes: int
    unplanned_bytes: int
    total_bytes: int
    bpw: float
    fp16_bytes: int
    ratio_vs_fp16: float


def _totals(layers: Sequence[PlanLayer], *, unplanned_bytes: int, fp16_bytes: int) -> PlanTotals:
    """Totals by the byte rules (module docstring): each tie group's tensor once."""
    once = {lay.group: lay for lay in layers}.values()
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


@dataclass
class Plan:
    """A ``bitplan.plan/v1`` document. Build with :func:`make_plan`, load with :func:`read_plan`."""

    model_ref: str
    model_sha256: str
    budget: dict[str, Any] | None
    layers: list[PlanLayer]
    totals: PlanTotals
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def predicted_error(self) -> float | None:
        return self.metrics.get("predicted_error")

    def choice(self) -> dict[str, str]:
        """``{group: format}``, the form the search and the applier work with."""
        return {lay.group: lay.format for lay in self.layers}

    def to_dict(self) -> dict[str, Any]:
        layers = [
            {**asdict(lay), "shape": list(lay.shape) if lay.shape else None} for lay in self.layers
        ]
        return {
            "schema": PLAN_SCHEMA,
            "model": {"ref": self.model_ref, "sha256": self.model_sha256},
            "budget": self.budget,
            "layers": layers,
            "totals": asdict(self.totals),
            "metrics": {"predicted_error": None, "calibration": {}, "holdout": {}, **self.metrics},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Parse and validate; any inconsistency is an InputError naming the field."""
        if not isinstance(data, Mapping):
            raise InputError("a plan must be a JSON object with schema " + PLAN_SCHEMA)
        if data.get("schema") != PLAN_SCHEMA:
            raise InputError(
                f"unsupported plan schema {data.get('schema')!r}; this bitplan reads {PLAN_SCHEMA}"
            )
        try:
            layers = [_layer_from_dict(item) for item in data["layers"]]
            totals = PlanTotals(**data["totals"])
            plan = cls(
                model_ref=str(data["model"]["ref"]),
                model_sha256=str(data["model"]["sha256"]),
                budget=data.get("budget"),
                layers=layers,
                totals=totals,
                metrics=dict(data.get("metrics") or {}),
            )
        except (KeyError, TypeError) as exc:
            raise InputError(
                f"plan is missing or mistypes a field ({exc}); see the {PLAN_SCHEMA} layout"
            ) from exc
        _validate(plan)
        return plan

    def write(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path


def _layer_from_dict(item: Mapping[str, Any]) -> PlanLayer:
    shape = item.get("shape")
    return PlanLayer(
        name=str(item["name"]),
        param=str(item["param"]),
        kind=item.get("kind"),
        shape=tuple(int(v) for v in shape) if shape else None,
        numel=int(item["numel"]),
        tie=item.get("tie") or None,
        format=str(item["format"]),
        bits=int(item["bits"]),
        group_size=item.get("group_size"),
        symmetric=bool(item["symmetric"]),
        bytes=int(item["bytes"]),
    )


def _validate(plan: Plan) -> None:
    if not plan.layers:
        raise InputError("plan has no layers")
    budget = plan.budget
    if budget is not None and (
        not isinstance(budget, Mapping)
        or budget.get("kind") not in ("bpw", "bytes", "ratio")
        or not isinstance(budget.get("value"), int | float)
    ):
        raise InputError(
            f'plan budget {budget!r} must be null or {{"kind": "bpw"|'
            '"bytes"|"ratio", "value": number}'
        )
    formats: dict[str, str] = {}
    for lay in plan.layers:
        fmt = parse_format(lay.format)
        if (lay.bits, lay.group_size, lay.symmetric) != (fmt.bits, fmt.group_size, fmt.symmetric):
            raise InputError(
                f"layer {lay.name}: bits/group_size/symmetric do not match format {lay.format}"
            )
        if lay.shape is not None and lay.bytes != tensor_bytes(fmt, *lay.shape):
            raise InputError(
                f"layer {lay.name}: {lay.bytes} bytes, but a {list(lay.shape)} "
                f"matrix in {fmt.name} takes {tensor_bytes(fmt, *lay.shape)}"
            )
        if formats.setdefault(lay.group, fmt.name) != fmt.name:
            raise InputError(
                f"tie group {lay.group} has two formats ({formats[lay.group]}, "
                f"{fmt.name}); tied layers share one tensor"
            )
    t = plan.totals
    want = _totals(plan.layers, unplanned_bytes=t.unplanned_bytes, fp16_bytes=t.fp16_bytes)
    for name in ("planned_bytes", "total_bytes", "bpw", "ratio_vs_fp16"):
        got, expected = getattr(t, name), getattr(want, name)
        if not math.isclose(got, expected, rel_tol=_REL_TOL, abs_tol=0.0):
            raise InputError(f"plan totals.{name} is {got} but its layers give {expected}")


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


def make_plan(
    *,
    model_ref: str,
    model_sha256: str,
    layers: Sequence[QuantLayer | LayerRow],
    choice: Mapping[str, str],
    budget: Budget | None,
    unplanned_bytes: int,
    fp16_bytes: int,
    predicted_error: float | None,
    metrics: Mapping[str, Any] | None = None,
) -> Plan:
    """A plan assigning ``choice[group]`` to every layer, with totals from the byte rules.

    ``choice`` maps each group (tie group name or layer name) to a format; ``metrics`` may hold
    ``calibration`` and ``holdout`` dicts of measured metrics.
    """
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
        model_ref=model_ref,
        model_sha256=model_sha256,
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


def _plan_layer(row: LayerRow, name: str) -> PlanLayer:
    fmt = parse_format(name)
    return PlanLayer(
        name=row.name,
        param=row.param,
        kind=row.kind,
        shape=row.shape,
        numel=row.numel,
        tie=row.tie,
        format=fmt.name,
        bits=fmt.bits,
        group_size=fmt.group_size,
        symmetric=fmt.symmetric,
        bytes=row.bytes_for(fmt),
    )


@dataclass(frozen=True)
class FrontierPoint:
    """One point of a frontier file; ``plan`` is the plan's path relative to the file."""

    plan_id: str
    total_bytes: int
    bpw: float
    predicted_error: float | None
    metrics: dict[str, Any]
    plan: str
    source: str

    @classmethod
    def of(cls, plan: Plan, *, plan_id: str, source: str) -> FrontierPoint:
        if source.split(":")[0] not in SOURCES:
            raise ValueError(f"unknown point source {source!r}; expected one of {SOURCES}")
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


@dataclass
class FrontierFile:
    """A ``bitplan.frontier/v1`` document: measured points and uniform reference points."""

    model: dict[str, str]
    budget: dict[str, Any] | None
    points: list[FrontierPoint]
    uniform: list[FrontierPoint]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": FRONTIER_SCHEMA,
            "model": self.model,
            "budget": self.budget,
            "points": [asdict(p) for p in self.points],
            "uniform": [asdict(p) for p in self.uniform],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FrontierFile:
        if data.get("schema") != FRONTIER_SCHEMA:
            raise InputError(
                f"unsupported frontier schema {data.get('schema')!r}; this "
                f"bitplan reads {FRONTIER_SCHEMA}"
            )
        try:
            return cls(
                model=dict(data["model"]),
                budget=data.get("budget"),
                points=[FrontierPoint(**p) for p in data["points"]],
                uniform=[FrontierPoint(**p) for p in data.get("uniform", [])],
            )
        except (KeyError, TypeError) as exc:
            raise InputError(f"frontier file is missing or mistypes a field ({exc})") from exc

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
            cells = [p.plan_id, p.source, p.total_bytes, p.bpw, p.predicted_error]
            cells += [
                p.metrics.get(split, {}).get(k) for split, names in keys.items() for k in names
            ]
            lines.append(",".join("" if c is None else str(c) for c in cells + [p.plan]))
        return "\n".join(lines) + "\n"


def write_frontier(
    out_dir: Path | str,
    *,
    model_ref: str,
    model_sha256: str,
    budget: Budget | None,
    points: Sequence[tuple[Plan, str]],
    uniform: Sequence[tuple[Plan, str]] = (),
) -> FrontierFile:
    """Write ``plans/<plan_id>.json`` for every point, ``frontier.json`` and ``frontier.csv``.

    ``points`` and ``uniform`` are ``(plan, source)`` pairs; points are ranked by total bytes
    for their ids, uniform points are named after their format (see the module docstring).
    """
    out = Path(out_dir)
    ranked = sorted(points, key=lambda pair: pair[0].totals.total_bytes)
    entries = []
    for rank, (plan, source) in enumerate(ranked):
        entries.append(
            FrontierPoint.of(plan, plan_id=f"p{rank:03d}-{plan.totals.bpw:.2f}bpw", source=source)
        )
    refs = []
    for plan, source in uniform:
        # A uniform plan's unpinned layers share one format; name it after the commonest.
        names = [lay.format for lay in plan.layers]
        refs.append(
            FrontierPoint.of(plan, plan_id=f"u-{max(names, key=names.count)}", source=source)
        )
    ids = [e.plan_id for e in entries + refs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"two frontier points would share a plan id: {sorted(ids)}")
    for entry, (plan, _) in zip(entries + refs, list(ranked) + list(uniform), strict=True):
        plan.write(out / entry.plan)
    result = FrontierFile(
        model={"ref": model_ref, "sha256": model_sha256},
        budget=budget.to_dict() if budget is not None else None,
        points=entries,
        uniform=refs,
    )
    (out / "frontier.json").write_text(
        json.dumps(result.to_dict(), indent=1) + "\n", encoding="utf-8"
    )
    (out / "frontier.csv").write_text(result.csv_text(), encoding="utf-8")
    return result


def read_frontier(path: Path | str) -> FrontierFile:
    """Load a ``frontier.json``."""
    path = Path(path)
    try:
        return FrontierFile.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as exc:
        raise InputError(f"frontier file {path} does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"frontier file {path} is not JSON ({exc})") from exc
