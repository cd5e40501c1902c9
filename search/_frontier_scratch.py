"""Reusable arrays for the frontier's merges.

A frontier of ``n`` points is rebuilt once per group, so a 500-group problem allocates a few
hundred arrays of a few megabytes each, each slightly larger than the last. Fresh memory of
that size comes straight from the operating system, and touching it costs a page fault per
4 KiB: measured, a third of the whole frontier's time went there. The merges therefore write
their large per-point arrays into buffers kept here, which only ever grow (by half again when
they must), and take their output from two buffers used in turn, so that a merge's input (the
previous output) is never overwritten by its own output.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Scratch"]


class Scratch:
    """Named buffers; :meth:`get` returns the first ``size`` items of one, growing it first."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}
        self._turn = 0

    def get(self, name: str, size: int, dtype: type[np.generic]) -> np.ndarray:
        """A ``(size,)`` view of buffer ``name`` (its contents are whatever was left there)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.dtype != dtype or len(buffer) < size:
            grown = 0 if buffer is None or buffer.dtype != dtype else len(buffer) + len(buffer) // 2
            buffer = np.empty(max(size, grown), dtype=dtype)
            self._buffers[name] = buffer
        return buffer[:size]

    def output(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``(bytes, error)`` views for a merge's output, from the pair not used last time."""
        self._turn ^= 1
        return (
            self.get(f"bytes{self._turn}", size, np.int64),
            self.get(f"error{self._turn}", size, np.float64),
        )
