"""Progress reporting and cooperative cancellation shared by every long-running step.

Library code never draws progress bars itself: it calls a ``ProgressFn`` that the CLI turns into
a rich bar and the worker turns into a job row update, and it polls a ``CancelFn`` between
units of work (layers, formats, trials) so a cancelled job stops promptly.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["CancelFn", "Cancelled", "ProgressFn", "check_cancel", "report"]

# progress(stage, done, total): `stage` is a short name ("analyze", "search", "validate"),
# `done`/`total` count units of that stage.
ProgressFn = Callable[[str, int, int], None]
CancelFn = Callable[[], bool]


class Cancelled(Exception):
    """Raised inside a step when its cancel check says stop; work finished so far is kept."""


def report(progress: ProgressFn | None, stage: str, done: int, total: int) -> None:
    """Call ``progress`` when one was given."""
    if progress is not None:
        progress(stage, done, total)


def check_cancel(should_cancel: CancelFn | None) -> None:
    """Raise :class:`Cancelled` when the caller asked to stop."""
    if should_cancel is not None and should_cancel():
        raise Cancelled("cancelled")
