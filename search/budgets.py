"""Memory budgets: the ``--budget`` syntax and its conversion into a cap on planned bytes.

A user states a budget the way they think about it (DESIGN §5): bits per planned weight
(``4.5bpw``), a total size (``60MB``, ``58MiB``, ``1.2GB``) or a fraction of the model's fp16
size (``0.3x``). The solver only needs one number, the most bytes the *planned* tensors may
take; :meth:`Budget.planned_cap` derives it from the model's byte accounting, and
:meth:`Budget.describe` turns a size back into the user's own unit for messages.

Arithmetic on the budget value goes through :class:`fractions.Fraction` of the decimal text, so
``0.3x`` of a model means exactly three tenths of it, never a float that rounds a byte over.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Annotated, Literal

from pydantic import Field
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

from bitplan.sensitivity.errors import InputError

__all__ = ["BYTE_UNITS", "Budget", "BudgetDict", "BudgetKind", "parse_budget"]

BudgetKind = Literal["bpw", "bytes", "ratio"]


class BudgetDict(TypedDict):
    """A budget as plan and frontier files store it (DESIGN §4), in the user's unit."""

    kind: Annotated[BudgetKind, Field(description="bpw, bytes or ratio (of the fp16 size)")]
    value: Annotated[float, Field(description="the budget in that unit")]


# Decimal units are powers of 10 (SI), binary units powers of 2 (IEC), as storage vendors and
# `ls -h --si` use them; the lookup is case-insensitive except that a lone "b" means bytes.
BYTE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_UNIT_SPELLING = {
    "b": "B",
    "kb": "kB",
    "mb": "MB",
    "gb": "GB",
    "tb": "TB",
    "kib": "KiB",
    "mib": "MiB",
    "gib": "GiB",
    "tib": "TiB",
}
_ACCEPTED = (
    "accepted: <bits>bpw (e.g. 4.5bpw), <size><unit> with unit B, kB, MB, GB, TB, "
    "KiB, MiB, GiB, TiB (e.g. 60MB, 58MiB, 1.2GB), or <fraction>x of the fp16 size "
    "(e.g. 0.3x)"
)
_BUDGET_RE = re.compile(r"^(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-z]+)$")


@dataclass(frozen=True)
class Budget:
    """A parsed budget. ``value`` is bits per weight (``bpw``), bytes (``bytes``, an integer
    count) or a fraction of the fp16 size (``ratio``); ``text`` is what the user wrote."""

    kind: BudgetKind
    value: float
    text: str

    @property
    def _exact(self) -> Fraction:
        """The value as an exact fraction of its decimal spelling."""
        return Fraction(repr(self.value)) if self.kind != "bytes" else Fraction(int(self.value))

    def planned_cap(self, *, planned_numel: int, unplanned_bytes: int, fp16_bytes: int) -> int:
        """The most bytes the planned tensors may take under this budget (may be negative).

        ``bpw`` caps the planned tensors alone; ``bytes`` and ``ratio`` cap the whole model,
        so the unplanned parameters (biases, norms, excluded layers) come off first.
        """
        if self.kind == "bpw":
            return math.floor(self._exact * planned_numel / 8)
        if self.kind == "bytes":
            return int(self.value) - unplanned_bytes
        return math.floor(self._exact * fp16_bytes) - unplanned_bytes

    def describe(
        self, *, planned_bytes: int, planned_numel: int, unplanned_bytes: int, fp16_bytes: int
    ) -> str:
        """A size in this budget's own unit, e.g. ``4.31bpw``, ``57.20MiB`` or ``0.287x``."""
        if self.kind == "bpw":
            return f"{8 * planned_bytes / max(planned_numel, 1):.3f}bpw"
        total = planned_bytes + unplanned_bytes
        if self.kind == "ratio":
            return f"{total / max(fp16_bytes, 1):.4f}x"
        unit = _unit_of(self.text)
        return f"{total / BYTE_UNITS[unit]:.3f}{_UNIT_SPELLING[unit]}"

    def to_dict(self) -> BudgetDict:
        """The plan file's ``budget`` object (DESIGN §4): ``{"kind", "value"}``."""
        value: float | int = int(self.value) if self.kind == "bytes" else self.value
        return BudgetDict(kind=self.kind, value=value)


def _unit_of(text: str) -> str:
    match = _BUDGET_RE.match(text.strip().lower())
    return match["unit"] if match is not None and match["unit"] in BYTE_UNITS else "b"


def parse_budget(text: str) -> Budget:
    """Parse ``4.5bpw``, ``60MB``/``58MiB``/``1.2GB`` or ``0.3x``; InputError otherwise."""
    if not isinstance(text, str):
        raise InputError(f"budget must be text, got {type(text).__name__}; {_ACCEPTED}")
    match = _BUDGET_RE.match(text.strip().lower())
    if match is None:
        raise InputError(f"cannot read budget {text!r}; {_ACCEPTED}")
    number, unit = Fraction(match["num"]), match["unit"]
    if number <= 0:
        raise InputError(f"budget {text!r} must be positive; {_ACCEPTED}")
    if unit == "bpw":
        if number > 32:  # fp32 is the widest storage there is: 32 bits a weight
            raise InputError(f"budget {text!r} exceeds 32 bits per weight (fp32); {_ACCEPTED}")
        return Budget(kind="bpw", value=float(match["num"]), text=text.strip())
    if unit == "x":
        return Budget(kind="ratio", value=float(match["num"]), text=text.strip())
    if unit in BYTE_UNITS:
        nbytes = math.floor(number * BYTE_UNITS[unit])
        if nbytes < 1:
            raise InputError(f"budget {text!r} is less than one byte; {_ACCEPTED}")
        return Budget(kind="bytes", value=nbytes, text=text.strip())
    raise InputError(f"unknown budget unit {match['unit']!r} in {text!r}; {_ACCEPTED}")
