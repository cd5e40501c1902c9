"""Format names and their exact byte accounting (DESIGN §3), without torch.

The grammar of a format name, the :class:`QuantFormat` it parses to and :func:`tensor_bytes` are
all a request, a plan file or a budget check needs, so they live here, apart from the torch
arithmetic of :mod:`bitplan.sensitivity.formats` (which re-exports them): validating a job or
reading a plan must not import torch.

Besides bitplan's own grid formats, llama.cpp's block formats (``q8_0`` … ``q2_k``, see
:mod:`bitplan.sensitivity.ggml_types`) are formats of kind ``ggml``. They apply only to matrices
whose ``cols`` their block divides; :func:`applicable_format` gives what llama.cpp stores
instead for other matrices, and :func:`candidate_formats` the formats a layer is scored in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.ggml_types import GGML_TYPES, GgmlType

__all__ = [
    "ALLOWED_BITS",
    "DEFAULT_FORMATS",
    "FLOAT_BYTES",
    "GGML_TYPES",
    "FormatError",
    "DATA_AWARE_ROUNDINGS",
    "ROUNDINGS",
    "QuantFormat",
    "applicable_format",
    "candidate_formats",
    "check_applicable",
    "parse_format",
    "parse_formats",
    "tensor_bytes",
]

ALLOWED_BITS = (2, 3, 4, 5, 6, 8)
FLOAT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

DEFAULT_FORMATS = ("int8", "int6-g128", "int4-g128", "int3-g64", "int2-g32-asym")

# How a layer's weights are rounded onto a format's grid (issue: rounding as a search dimension).
# ``rtn`` rounds to nearest (DESIGN §3); the others pick other integers and scales on the same
# grid, so bytes never change (see :mod:`bitplan.sensitivity.rounding`). gptq and awq need the
# calibration inputs; hqq is data-free.
ROUNDINGS = ("rtn", "gptq", "awq", "hqq")
DATA_AWARE_ROUNDINGS = frozenset({"gptq", "awq"})

_INT_RE = re.compile(r"^int(?P<bits>\d+)(?:-g(?P<group>\d+))?(?P<asym>-asym)?$")
_ACCEPTED = (
    "fp32, bf16, fp16, fp8-e4m3, or int{b}[-g{G}][-asym] with b in "
    + "{"
    + ",".join(map(str, ALLOWED_BITS))
    + "} and G a positive integer (e.g. int8, int4-g128, int3-g64-asym), or a llama.cpp "
    + "block format: "
    + ", ".join(GGML_TYPES)
)
# What a matrix whose rows fit no llama.cpp block type is stored as (llama.cpp keeps it F16).
_GGML_LAST_RESORT = "fp16"


class FormatError(InputError):
    """A format name that bitplan does not accept; the message lists what it accepts."""


@dataclass(frozen=True)
class QuantFormat:
    """One storage format for a weight matrix.

    ``kind`` is ``float`` (fp32/bf16/fp16: a cast), ``fp8`` (per-row scaled e4m3), ``int``
    (uniform integer grid) or ``ggml`` (a llama.cpp block type; ``group_size`` is its block,
    ``bits`` its nominal code width, ``symmetric`` False when blocks store a minimum).
    ``group_size`` is ``None`` for one scale per row.

    ``rounding`` (int formats only) says how weights are rounded onto the grid; a format with a
    rounding other than ``rtn`` is a distinct planning option named ``<format>+<rounding>``
    (``int4-g128+gptq``) with the same bytes. :attr:`base_name` is the storage format's name,
    what plan files and runtimes see.
    """

    name: str
    kind: Literal["float", "fp8", "int", "ggml"]
    bits: int
    group_size: int | None = None
    symmetric: bool = True
    rounding: str = "rtn"

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise FormatError(
                f"unknown rounding {self.rounding!r}; accepted: {', '.join(ROUNDINGS)}"
            )
        if self.rounding != "rtn" and self.kind != "int":
            raise FormatError(
                f"{self.base_name} takes only rtn rounding; {self.rounding} applies to the "
                "int{b}[-g{G}][-asym] formats"
            )
        if self.kind == "int":
            if self.bits not in ALLOWED_BITS:
                raise FormatError(f"unsupported bit width {self.bits}; accepted: {_ACCEPTED}")
            if self.group_size is not None and self.group_size < 1:
                raise FormatError(f"group size must be positive; accepted: {_ACCEPTED}")
        elif self.kind == "ggml":
            t = GGML_TYPES.get(self.name)
            if t is None or (self.bits, self.group_size, self.symmetric) != (
                t.bits,
                t.block,
                t.symmetric,
            ):
                raise FormatError(f"{self.name} is no llama.cpp block format bitplan knows")
        elif self.group_size is not None or not self.symmetric:
            raise FormatError(f"{self.kind} formats take no group size or -asym")

    @property
    def base_name(self) -> str:
        """The storage format's name, without the rounding (``int4-g128`` of ``int4-g128+gptq``)."""
        return self.name.partition("+")[0]

    def with_rounding(self, rounding: str) -> QuantFormat:
        """This storage format with ``rounding`` (named ``<format>+<rounding>`` unless rtn)."""
        name = self.base_name if rounding == "rtn" else f"{self.base_name}+{rounding}"
        return replace(self, name=name, rounding=rounding)

    @property
    def is_quantized(self) -> bool:
        """True for formats with scales (int, fp8, ggml); False for plain casts."""
        return self.kind != "float"

    @property
    def ggml(self) -> GgmlType | None:
        """The llama.cpp block type of a ``ggml`` format (None for other kinds)."""
        return GGML_TYPES[self.name] if self.kind == "ggml" else None

    def applies_to(self, cols: int) -> bool:
        """Whether a matrix with rows of ``cols`` weights can be stored in this format: always,
        except a ggml format whose block does not divide ``cols`` (llama.cpp's rule)."""
        return self.ggml is None or cols % self.ggml.block == 0

    def n_groups(self, rows: int, cols: int) -> int:
        """Number of scales (ggml: blocks) for a ``[rows, cols]`` matrix (0 for plain casts)."""
        if self.kind == "float":
            return 0
        if self.ggml is not None:
            return rows * (cols // self.ggml.block)
        if self.kind == "fp8" or self.group_size is None:
            return rows
        return rows * math.ceil(cols / self.group_size)

    def bits_per_weight(self, cols: int = 4096) -> float:
        """Storage bits per weight for a matrix with ``cols`` columns, scales included."""
        rows = 1024  # any row count: per-row overheads scale with rows like the weights do
        return 8 * tensor_bytes(self, rows, cols) / (rows * cols)


def parse_format(name: str) -> QuantFormat:
    """Parse a format name (DESIGN §3), optionally with a rounding (``int4-g128+gptq``); the
    error message says what is accepted."""
    text, plus, rounding = name.strip().lower().partition("+")
    if plus:
        return parse_format(text).with_rounding(rounding.strip())
    if text in GGML_TYPES:
        t = GGML_TYPES[text]
        return QuantFormat(
            name=text, kind="ggml", bits=t.bits, group_size=t.block, symmetric=t.symmetric
        )
    if text in FLOAT_BYTES:
        return QuantFormat(name=text, kind="float", bits=8 * FLOAT_BYTES[text])
    if text == "fp8-e4m3":
        return QuantFormat(name=text, kind="fp8", bits=8)
    match = _INT_RE.match(text)
    if match is None:
        raise FormatError(f"unknown format {name!r}; accepted: {_ACCEPTED}")
    bits = int(match["bits"])
    group = int(match["group"]) if match["group"] is not None else None
    if bits not in ALLOWED_BITS:
        raise FormatError(
            f"unsupported format {name!r}: no {bits}-bit integers; accepted: {_ACCEPTED}"
        )
    if group is not None and group < 1:
        raise FormatError(f"unsupported format {name!r}: group size 0; accepted: {_ACCEPTED}")
    return QuantFormat(
        name=text, kind="int", bits=bits, group_size=group, symmetric=match["asym"] is None
    )


def parse_formats(names: str | Sequence[str | QuantFormat]) -> list[QuantFormat]:
    """Parse a comma-separated list (or a sequence) of names, rejecting duplicates.

    Items of a sequence that are already :class:`QuantFormat` are kept as they are.
    """
    items = names.split(",") if isinstance(names, str) else list(names)
    formats = [
        item if isinstance(item, QuantFormat) else parse_format(item)
        for item in items
        if isinstance(item, QuantFormat) or item.strip()
    ]
    if not formats:
        raise FormatError(f"no format given; accepted: {_ACCEPTED}")
    seen = [f.name for f in formats]
    dupes = sorted({n for n in seen if seen.count(n) > 1})
    if dupes:
        raise FormatError(f"format listed twice: {', '.join(dupes)}")
    return formats


def applicable_format(fmt: QuantFormat, cols: int) -> QuantFormat:
    """The format a matrix with rows of ``cols`` weights is stored in when ``fmt`` is asked.

    ``fmt`` itself when it applies; for a ggml format whose block does not divide ``cols``,
    llama.cpp's fallback (q4_k → q5_0, q6_k → q8_0, …), and fp16 when that does not fit either
    (``tensor_type_fallback`` in llama.cpp's ``llama-quant.cpp``).
    """
    current = fmt
    while not current.applies_to(cols):
        t = current.ggml
        current = parse_format(t.fallback if t is not None and t.fallback else _GGML_LAST_RESORT)
    return current


def candidate_formats(formats: Sequence[QuantFormat], cols: int) -> list[QuantFormat]:
    """The formats a layer with rows of ``cols`` weights is scored and planned in: each of
    ``formats`` as :func:`applicable_format` maps it, each once, in order."""
    return list(dict.fromkeys(applicable_format(f, cols) for f in formats))


def check_applicable(fmt: QuantFormat, cols: int) -> None:
    """Raise a :class:`FormatError` naming the fallback when ``fmt`` cannot store rows of
    ``cols`` weights (a ggml format whose block does not divide ``cols``)."""
    t = fmt.ggml
    if t is not None and not fmt.applies_to(cols):
        raise FormatError(
            f"{fmt.name} stores rows in blocks of {t.block} weights; rows of {cols} weights do "
            f"not fit (llama.cpp would store such a matrix in "
            f"{applicable_format(fmt, cols).name})"
        )


def tensor_bytes(fmt: QuantFormat, rows: int, cols: int) -> int:
    """Exact stored bytes of a ``[rows, cols]`` matrix in ``fmt`` (DESIGN §3).

    A ggml format stores ``cols/block`` blocks of ``type_size`` bytes a row, exactly as ggml
    lays them out; a matrix it does not apply to is a :class:`FormatError`.
    """
    numel = rows * cols
    t = fmt.ggml
    if t is not None:
        check_applicable(fmt, cols)
        return rows * (cols // t.block) * t.type_size
    if fmt.kind == "float":
        return numel * FLOAT_BYTES[fmt.name]
    if fmt.kind == "fp8":
        return numel + 2 * rows
    n_groups = fmt.n_groups(rows, cols)
    bits = numel * fmt.bits + n_groups * 16 + (0 if fmt.symmetric else n_groups * fmt.bits)
    return math.ceil(bits / 8)
