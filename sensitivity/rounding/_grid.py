"""A format's integer grid with given scales: encode, decode, and group geometry.

:func:`bitplan.sensitivity.formats.quantize_codes` derives a group's scale (and zero-point) from
the group itself and rounds to nearest. Every other rounding in this package keeps the format's
grid but chooses the scales, the zero-points or the codes differently, so it needs the two halves
of DESIGN §3's arithmetic separately: codes for *given* scale and zero-point (:func:`encode`) and
values for given codes (:func:`decode`). Both follow DESIGN §3 exactly, so codes made here
dequantize through :func:`bitplan.sensitivity.formats.dequantize` to the same values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bitplan.sensitivity.formats import QuantCodes, QuantFormat, _group_size, _grouped

__all__ = ["Groups", "code_range", "concat_codes", "decode", "encode", "to_codes"]


def code_range(fmt: QuantFormat) -> tuple[int, int]:
    """The smallest and largest code of an int format (DESIGN §3)."""
    if fmt.symmetric:
        qmax = 2 ** (fmt.bits - 1) - 1
        return -qmax, qmax
    return 0, 2**fmt.bits - 1


def encode(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: QuantFormat
) -> torch.Tensor:
    """Float codes ``clamp(round(w / scale) [+ zero], lo, hi)``; ``scale`` and ``zero``
    broadcast against ``w``. ``zero`` is None for symmetric formats."""
    lo, hi = code_range(fmt)
    q = torch.round(w / scale)
    if zero is not None:
        q = q + zero
    return torch.clamp(q, lo, hi)


def decode(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Values ``(q [− zero]) · scale`` of float codes (broadcasting like :func:`encode`)."""
    return (q if zero is None else q - zero) * scale


@dataclass(frozen=True)
class Groups:
    """How a ``[rows, cols]`` matrix splits into the format's groups along ``cols``."""

    cols: int
    size: int  # G: columns per group (the whole row for a per-row format)

    @classmethod
    def of(cls, fmt: QuantFormat, cols: int) -> Groups:
        return cls(cols=cols, size=_group_size(fmt, cols))

    @property
    def count(self) -> int:
        """Groups per row; the last one may be shorter than :attr:`size`."""
        return math.ceil(self.cols / self.size)

    def view(self, w: torch.Tensor) -> torch.Tensor:
        """``[rows, cols]`` as ``[rows, count, size]``; a short last group is padded with the
        row's last value (see :func:`~bitplan.sensitivity.formats.quantize_codes`)."""
        return _grouped(w, self.size)  # (rows, n_groups, G)

    def mask(self, device: torch.device) -> torch.Tensor:
        """``[count, size]``: 1.0 where a slot of :meth:`view` holds a real column, 0.0 on
        the padding of a short last group."""
        return (
            (torch.arange(self.count * self.size, device=device) < self.cols)
            .to(torch.float32)
            .reshape(self.count, self.size)
        )  # (n_groups, G)

    def unview(self, g: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`view`: ``[rows, count, size]`` back to ``[rows, cols]``."""
        return g.reshape(g.shape[0], -1)[:, : self.cols]  # (rows, cols)


def to_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> QuantCodes:
    """Package float codes ``[rows, cols]`` with float32 scales and zero-points
    ``[rows, n_groups]`` as the :class:`QuantCodes` the format stores (int16, fp16, int16).

    The scales must already be float16 values (the caller rounded them), so the cast is exact.
    """
    return QuantCodes(
        q=q.to(torch.int16),
        scale=scale.to(torch.float16),
        zero=None if zero is None else zero.to(torch.int16),
    )


def concat_codes(parts: Sequence[QuantCodes]) -> QuantCodes:
    """The codes of consecutive chunks of rows, as one matrix's codes."""
    if len(parts) == 1:
        return parts[0]
    zeros = [p.zero for p in parts if p.zero is not None]
    return QuantCodes(
        q=torch.cat([p.q for p in parts]),
        scale=torch.cat([p.scale for p in parts]),
        zero=torch.cat(zeros) if zeros else None,
    )
