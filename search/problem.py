"""The planning problem as a multiple-choice knapsack, built from a sensitivity table.

Under the additive proxy model a plan's predicted error is the sum of its layers' errors and
its size the sum of its tensors' bytes. Each *group* picks exactly one format: a multiple-choice
knapsack. A group is a layer, a tie group (layers that share one tensor) or a share group
(separate tensors that must take one format, e.g. fused q/k/v; DESIGN §6), keyed by
:attr:`LayerRow.group`. A group's bytes are summed over its distinct tensors, a tie's tensor
counted once; its error is the sum of all its members' errors for that format; its options are
the formats every member has a table row for (a format one member cannot take is no option for
the group); a pin on any member pins the group, and two different pins are an error; excluded
layers are not in the problem at all and count with the unplanned bytes.

Formats are parsed once, where they enter: a table's ``format`` column when the problem is built,
a pin when a layer row is made. From there on a group's options, its pin and every choice hold
:class:`~bitplan.sensitivity.format_spec.QuantFormat` objects, never names.

A table may come with the model's layers (shapes known: bytes follow from
:func:`bitplan.sensitivity.formats.tensor_bytes`) or alone, as a user CSV (bytes come from its
``bytes`` column, or are estimated from ``numel`` when it has none).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bitplan.search.points import Choice, Point
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import (
    QuantFormat,
    applicable_format,
    parse_format,
    tensor_bytes,
)
from bitplan.sensitivity.layers import QuantLayer

__all__ = [
    "Group",
    "LayerRow",
    "Problem",
    "as_layer_rows",
    "build_problem",
    "estimated_bytes",
    "rows_from_table",
]

log = logging.getLogger(__name__)

# Without shapes, a per-row format's scale overhead is unknown; 4096 columns is the typical
# hidden size of the models these tables come from (the overhead is 16/4096 bits a weight).
_ASSUMED_COLS = 4096


@dataclass(frozen=True)
class LayerRow:
    """One planned layer as a plan needs it. ``kind``/``shape`` are None for a table without a
    model; ``table_bytes`` then gives each format's bytes. ``tie`` and ``share`` name its tie
    and share groups (see :class:`~bitplan.sensitivity.layers.QuantLayer`), or are None."""

    name: str
    param: str
    numel: int
    tie: str | None = None
    share: str | None = None
    kind: str | None = None
    shape: tuple[int, int] | None = None
    pinned: QuantFormat | None = None
    table_bytes: Mapping[QuantFormat, int] = field(default_factory=dict)

    @property
    def tensor_key(self) -> str:
        """The stored tensor: the tie group, or the layer itself (bytes count once per key)."""
        return self.tie or self.name

    @property
    def group(self) -> str:
        """The unit a plan decides on: the share group, else the tie group, else the layer."""
        return self.share or self.tensor_key

    @classmethod
    def from_quant_layer(cls, layer: QuantLayer) -> LayerRow:
        """The row of a model's layer; its pin (a name, as the model loader keeps it) parsed."""
        return cls(
            name=layer.name,
            param=layer.param,
            numel=layer.numel,
            tie=layer.tie,
            share=layer.share,
            kind=layer.kind,
            shape=layer.shape,
            pinned=parse_format(layer.pinned) if layer.pinned is not None else None,
        )

    def bytes_for(self, fmt: QuantFormat) -> int:
        """Exact bytes of this layer's tensor in ``fmt`` (from the shape, else the table)."""
        if self.shape is not None:
            return tensor_bytes(fmt, *self.shape)
        if fmt not in self.table_bytes:
            raise InputError(
                f"no bytes known for layer {self.name} in {fmt.name}; add a row for it to the table"
            )
        return int(self.table_bytes[fmt])


def as_layer_rows(layers: Sequence[QuantLayer | LayerRow]) -> list[LayerRow]:
    """Normalise a mix of :class:`QuantLayer` and :class:`LayerRow` to rows."""
    return [lay if isinstance(lay, LayerRow) else LayerRow.from_quant_layer(lay) for lay in layers]


def estimated_bytes(fmt: QuantFormat, numel: int) -> int:
    """Bytes of ``numel`` weights in ``fmt`` when the shape is unknown: exact for grouped
    formats whose group divides the row, per-row overhead assuming 4096 columns otherwise."""
    if fmt.kind == "float":
        return numel * fmt.bits // 8
    if fmt.kind == "fp8":
        return numel + 2 * math.ceil(numel / _ASSUMED_COLS)
    if fmt.ggml is not None:  # whole blocks: exact when the block divides the rows
        return math.ceil(numel / fmt.ggml.block) * fmt.ggml.type_size
    n_groups = math.ceil(numel / (fmt.group_size or _ASSUMED_COLS))
    bits = numel * fmt.bits + n_groups * 16 + (0 if fmt.symmetric else n_groups * fmt.bits)
    return math.ceil(bits / 8)


@dataclass
class Group:
    """One decision: the layers that take one format (a layer, a tie or a share group), and
    their options.

    ``formats[i]`` costs ``bytes[i]`` (summed over the group's ``tensors`` distinct tensors) and
    predicts ``error[i]`` (summed over ``members``); ``numel`` counts the distinct tensors'
    weights.
    """

    key: str
    members: list[str]
    numel: int
    formats: list[QuantFormat]
    bytes: np.ndarray  # int64 (n_options,)
    error: np.ndarray  # float64 (n_options,)
    pinned: QuantFormat | None = None
    # Row length of the group's first member's matrix (None: a table without a model); a share
    # group's members may differ, and then uniform_choice finds no option for a ggml format that
    # one member stores and another replaces by its fallback.
    cols: int | None = None
    tensors: int = 1


@dataclass
class Problem:
    """Groups plus the model-level byte accounting a budget needs."""

    groups: list[Group]
    layers: list[LayerRow]
    unplanned_bytes: int
    fp16_bytes: int

    @property
    def planned_numel(self) -> int:
        """Weights in planned tensors, each tied tensor counted once."""
        return sum(g.numel for g in self.groups)

    def choice_of(self, option: Sequence[int]) -> dict[str, QuantFormat]:
        """``{group key: format}`` for one option index per group."""
        return {g.key: g.formats[i] for g, i in zip(self.groups, option, strict=True)}

    def uniform_choice(self, fmt: QuantFormat) -> dict[str, QuantFormat] | None:
        """Every group in ``fmt`` (pinned groups keep their pin; a group whose rows ``fmt``
        cannot store takes what llama.cpp would, see ``applicable_format``); None when some
        group has no such option in the table."""
        choice = {}
        for g in self.groups:
            want = g.pinned or (fmt if g.cols is None else applicable_format(fmt, g.cols))
            if want not in g.formats:
                # e.g. a share group whose members' rows differ in length, so that one member
                # stores ``fmt`` and another its fallback: the baseline is dropped, not faked.
                log.info(
                    "no uniform %s baseline: group %s has no %s option (its options: %s)",
                    fmt.name,
                    g.key,
                    want.name,
                    ", ".join(f.name for f in g.formats),
                )
                return None
            choice[g.key] = want
        return choice

    def cost(self, choice: Choice) -> tuple[int, float]:
        """``(planned_bytes, predicted_error)`` of a choice under the additive model."""
        nbytes, error = 0, 0.0
        for g in self.groups:
            i = g.formats.index(choice[g.key])
            nbytes += int(g.bytes[i])
            error += float(g.error[i])
        return nbytes, error

    def point(self, choice: Choice, *, source: str, number: int | None = None) -> Point:
        """``choice`` as a :class:`Point` sized and predicted by the additive model."""
        nbytes, error = self.cost(choice)
        return Point(
            choice=dict(choice),
            planned_bytes=nbytes,
            predicted_error=error,
            source=source,
            number=number,
        )


def _tensors(members: list[LayerRow]) -> dict[str, list[LayerRow]]:
    """The group's members by the tensor they store (a tie group's members share one)."""
    tensors: dict[str, list[LayerRow]] = {}
    for m in members:
        tensors.setdefault(m.tensor_key, []).append(m)
    return tensors


def _group_options(
    key: str,
    members: list[LayerRow],
    pinned: QuantFormat | None,
    errors: dict[str, dict[QuantFormat, float]],
) -> tuple[list[QuantFormat], np.ndarray, np.ndarray]:
    """Formats every member has a row for (by name), each with the bytes of the group's
    distinct tensors (a tie's tensor once) and the error summed over every member."""
    per_member = {m.name: errors.get(m.name, {}) for m in members}
    if pinned is not None:
        formats = [pinned]
    else:
        common = set.intersection(*(set(e) for e in per_member.values()))
        formats = sorted(common, key=lambda f: f.name)
    if not formats:
        raise InputError(
            f"{key}: no format has a table row for every member "
            f"({', '.join(m.name for m in members)})"
        )
    tensors = _tensors(members)
    nbytes, error = [], []
    for fmt in formats:
        total = 0
        for tensor, rows in tensors.items():
            sizes = {m.bytes_for(fmt) for m in rows}
            if len(sizes) > 1:
                raise InputError(
                    f"tie group {tensor} members disagree on bytes in {fmt}: "
                    f"{sorted(sizes)}; tied layers share one tensor"
                )
            total += sizes.pop()
        nbytes.append(total)
        unmeasured = [name for name, e in per_member.items() if fmt not in e]
        if unmeasured:
            log.warning(
                "%s is pinned to %s, which the table does not measure for %s; that error "
                "counts as 0 (a constant offset: the frontier's plans are unchanged)",
                key,
                fmt.name,
                ", ".join(unmeasured),
            )
        error.append(sum(e[fmt] for e in per_member.values() if fmt in e))
    return formats, np.asarray(nbytes, dtype=np.int64), np.asarray(error, dtype=np.float64)


def _group_pin(key: str, members: list[LayerRow]) -> QuantFormat | None:
    """The group's pin: any member's (one pinned member pins the group); two different pins
    are an error naming the layers."""
    pinned = {m.name: m.pinned for m in members if m.pinned is not None}
    if len(set(pinned.values())) > 1:
        names = ", ".join(f"{name}={fmt.name}" for name, fmt in pinned.items())
        raise InputError(
            f"group {key} has members pinned to different formats ({names}); its layers "
            "take one format, so pin them alike"
        )
    return next(iter(pinned.values()), None)


def _check_grouping(by_group: dict[str, list[LayerRow]]) -> None:
    """Each group key names one thing, and a tied tensor lies in one group.

    A share group named like another layer (or a tie group), or a tie split across share
    groups, would silently merge or split decisions; both are errors that say the fix.
    """
    for key, members in by_group.items():
        origins = {"share group" if m.share else "tie group" if m.tie else "layer" for m in members}
        if len(origins) > 1:
            raise InputError(
                f"{key} names both a {' and a '.join(sorted(origins))}; give the group "
                "a name of its own"
            )
    where: dict[str, str] = {}
    for key, members in by_group.items():
        for m in members:
            other = where.setdefault(m.tensor_key, key)
            if other != key:
                raise InputError(
                    f"tie group {m.tensor_key} is split across groups {other} and {key}; "
                    "tied layers share one tensor, so put all of them in one share group"
                )


def _text_cell(value: object) -> str | None:
    """A text cell (tie, group, param): the text, or None for empty / NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def rows_from_table(table: pd.DataFrame) -> list[LayerRow]:
    """Layer rows of a table that comes without a model (a user CSV).

    Bytes come from the ``bytes`` column; without one they are estimated from ``numel`` (see
    :func:`estimated_bytes`) and a warning says so. ``numel`` may be left out when the table
    has a plain-float row (fp16/bf16/fp32) for every layer to derive it from. ``param`` defaults
    to ``<layer>.weight``: every plannable module keeps its matrix in ``weight``. A ``tie``
    column names tie groups (one shared tensor), a ``group`` column share groups (separate
    tensors that take one format, DESIGN §6).
    """
    has_bytes, has_numel = "bytes" in table.columns, "numel" in table.columns
    if not has_bytes and not has_numel:
        raise InputError(
            "the table needs a bytes or a numel column to size its layers; "
            "columns accepted: layer, format, error[, bytes][, numel][, tie][, group]"
        )
    if not has_bytes:
        log.warning(
            "the table has no bytes column: bytes are estimated from numel (exact "
            "for grouped formats whose group divides the row)"
        )
    rows = []
    for name, part in table.groupby("layer", sort=False):
        formats = [parse_format(f) for f in part["format"]]
        if has_numel:
            numel = int(part["numel"].iloc[0])
        else:
            floats = [
                (f, b) for f, b in zip(formats, part["bytes"], strict=True) if f.kind == "float"
            ]
            if not floats:
                raise InputError(
                    f"layer {name}: no numel column and no fp16/bf16/fp32 row to "
                    "derive the weight count from; add a numel column"
                )
            numel = int(floats[0][1]) * 8 // floats[0][0].bits
        sizes = part["bytes"] if has_bytes else [estimated_bytes(f, numel) for f in formats]
        param = part["param"].iloc[0] if "param" in part.columns else None
        tie = _text_cell(part["tie"].iloc[0]) if "tie" in part.columns else None
        share = _text_cell(part["group"].iloc[0]) if "group" in part.columns else None
        rows.append(
            LayerRow(
                name=str(name),
                param=str(param) if _text_cell(param) else f"{name}.weight",
                numel=numel,
                tie=tie,
                share=share,
                table_bytes={f: int(b) for f, b in zip(formats, sizes, strict=True)},
            )
        )
    return rows


def build_problem(
    table: pd.DataFrame,
    layers: Sequence[QuantLayer | LayerRow],
    *,
    unplanned_bytes: int,
    fp16_bytes: int,
) -> Problem:
    """The knapsack for ``layers`` from a sensitivity table (columns layer, format, error).

    Table rows for layers that are not in ``layers`` (excluded since the table was measured)
    are ignored; a planned layer without rows is an error unless it is pinned.
    """
    rows = as_layer_rows(layers)
    bad = table[~np.isfinite(table["error"].to_numpy(dtype=np.float64))]
    if len(bad):
        raise InputError(
            f"table error for {bad['layer'].iloc[0]} in {bad['format'].iloc[0]} "
            "is not a finite number"
        )
    if not rows:
        raise InputError("nothing to plan: every layer is excluded")
    planned = {r.name for r in rows}
    extra = set(table["layer"]) - planned
    if extra:
        log.info(
            "ignoring %d table layers that are not planned (excluded): %s",
            len(extra),
            ", ".join(sorted(extra)[:5]),
        )
    parsed = {name: parse_format(name) for name in table["format"].unique()}  # once a name
    errors: dict[str, dict[QuantFormat, float]] = {}
    for layer, name, err in zip(table["layer"], table["format"], table["error"], strict=True):
        cell = errors.setdefault(layer, {})
        fmt = parsed[name]
        if fmt in cell:
            raise InputError(
                f"the table has two rows for layer {layer} in {fmt.name}; "
                "keep one row per (layer, format)"
            )
        cell[fmt] = float(err)
    by_group: dict[str, list[LayerRow]] = {}
    for r in rows:
        by_group.setdefault(r.group, []).append(r)
    _check_grouping(by_group)
    groups = []
    for key, members in by_group.items():
        pinned = _group_pin(key, members)
        formats, nbytes, error = _group_options(key, members, pinned, errors)
        tensors = _tensors(members)
        groups.append(
            Group(
                key=key,
                members=[m.name for m in members],
                numel=sum(tensor_rows[0].numel for tensor_rows in tensors.values()),
                formats=formats,
                bytes=nbytes,
                error=error,
                pinned=pinned,
                cols=members[0].shape[1] if members[0].shape is not None else None,
                tensors=len(tensors),
            )
        )
    return Problem(
        groups=groups, layers=rows, unplanned_bytes=unplanned_bytes, fp16_bytes=fp16_bytes
    )
