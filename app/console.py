"""Terminal output for the CLI: rich progress bars fed by library progress callbacks, and the
one-line error convention (bad input → one line on stderr, exit code 2, never a traceback)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.progress import ProgressFn

__all__ = ["console", "err_console", "exit_on_input_error", "progress_bars", "setup_logging"]

console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")


def setup_logging(verbose: bool) -> None:
    """Library modules log; the CLI shows warnings (or everything with --verbose)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
        force=True,
    )


def exit_on_input_error(fn: Callable[[], T]) -> T:
    """Run ``fn``; bad input becomes one line on stderr and exit code 2."""
    try:
        return fn()
    except InputError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None


@contextmanager
def progress_bars(*, transient: bool = False) -> Iterator[ProgressFn]:
    """A ``ProgressFn`` that draws one rich bar per stage (``analyze``, ``search``, …)."""
    tasks: dict[str, TaskID] = {}
    with Progress(
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
    ) as bars:

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield update
