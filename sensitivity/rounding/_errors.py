"""The error every rounding raises for input it cannot use."""

from __future__ import annotations

from bitplan.sensitivity.errors import InputError

__all__ = ["RoundingError"]


class RoundingError(InputError):
    """A rounding that does not exist, does not apply to the format, or lacks its inputs."""
