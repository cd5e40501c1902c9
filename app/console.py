"""Terminal conventions of the CLI: rich progress bars fed by library progress callbacks, logging,
and how a command ends.

- bad input → one line on stderr, exit code 2, never a traceback;
- Ctrl-C → exit code 130 (128 + SIGINT, as shells report it); a search stopped by Ctrl-C still
  writes what it finished first (see :func:`ctrl_c_watch`);
- a failed command removes the output folder it created (see :func:`output_folder`), so no empty
  or half-written folder is left behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.progress import ProgressFn

if TYPE_CHECKING:
    from rich.progress import TaskID

__all__ = [
    "CTRL_C_EXIT",
    "console",
    "ctrl_c_watch",
    "err_console",
    "output_folder",
    "progress_bars",
    "quiet_third_party",
    "run_command",
    "setup_logging",
]

console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")

CTRL_C_EXIT = 128 + signal.SIGINT  # 130: what a shell reports for a process ended by Ctrl-C

# Hugging Face libraries draw their own tqdm bars ("Loading weights") and log advisories; they
# tear through bitplan's rich bars. Both read these variables when first imported; a user who
# sets them keeps their own values.
_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
# Loggers that warn, when transformers imports torchao, about CUDA kernels and Triton a CPU
# machine lacks and about a torch deprecation: noise for weight-only work, naming local paths.
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def setup_logging(verbose: bool) -> None:
    """Library modules log; the CLI shows warnings (or everything with --verbose)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
        force=True,
    )
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)


def quiet_third_party() -> None:
    """Silence third-party progress bars and advisories in this process and its children."""
    for name, value in _QUIET_ENV.items():
        os.environ.setdefault(name, value)


def run_command(fn: Callable[[], T]) -> T:
    """Run a command's body: bad input is one line on stderr and exit code 2; Ctrl-C is exit
    code 130 with a one-line note instead of a traceback."""
    try:
        return fn()
    except InputError as exc:
        # escaped: a message's "[qkv]" or "bitplan[runtimes]" is text, not rich markup
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(code=CTRL_C_EXIT) from None


@contextmanager
def output_folder(path: Path) -> Iterator[Path]:
    """Yield ``path``; when the block fails (an error or Ctrl-C) and ``path`` did not exist
    before, remove the folders the block created — ``path`` and any missing parents of it —
    so a failed command leaves nothing behind. An existing folder is never touched."""
    created = None
    for folder in (path, *path.parents):  # the outermost folder that does not exist yet
        if folder.exists():
            break
        created = folder
    try:
        yield path
    except BaseException:
        if created is not None and created.is_dir():
            shutil.rmtree(created, ignore_errors=True)
        raise


@contextmanager
def ctrl_c_watch() -> Iterator[Callable[[], bool]]:
    """Yield a function that tells whether Ctrl-C was pressed inside the block.

    Ctrl-C still raises ``KeyboardInterrupt`` where it lands, so a search stops early and keeps
    its finished trials as before; but the search swallows that exception, and the command
    needs to know, after writing the results, that it must exit 130 rather than 0.
    """
    pressed = threading.Event()
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is signal.SIG_IGN:
        yield pressed.is_set  # no handler can be set here, or Ctrl-C is meant to be ignored
        return

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        pressed.set()
        if callable(previous):
            previous(signum, frame)  # Python's default handler raises KeyboardInterrupt
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield pressed.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def progress_bars(*, transient: bool = False) -> Iterator[ProgressFn]:
    """A ``ProgressFn`` that draws one rich bar per stage (``analyze``, ``search``, …)."""
    # Imported here: only commands that show bars pay for it, not `--help` or `status`.
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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
