"""The ``bitplan`` command line: the root Typer app and the list of its commands.

Each command is a module-level function (or a Typer sub-app) in a small module of
:mod:`bitplan.app.commands`; :data:`COMMANDS` lists them all, in the order ``--help`` shows:

- planning on this machine: ``formats``, ``analyze``, ``search``, ``solve``, ``apply``;
- the service, as its operator: ``db upgrade``, ``keys create``, ``serve``, ``worker``;
- a job on a service: ``submit``, ``status``, ``wait``, ``cancel``, ``download``, ``model``;
  ``demo``.

A command's module is imported only when that command runs or shows its own help: the planning
commands read their defaults from :class:`~bitplan.search.spec.JobSpec` (pydantic) and the
operator commands from the settings (pydantic-settings), which ``bitplan --help`` and ``bitplan
status`` do not need, so these start at once. ``bitplan --help`` lists the one-line summaries
below. Nothing here imports torch, pandas, Optuna, SQLAlchemy or the HTTP client either.
Bad input prints one line and exits with code 2; Ctrl-C exits with code 130.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from bitplan.app.console import quiet_third_party, setup_logging

__all__ = ["COMMANDS", "app", "main"]


@dataclass(frozen=True)
class Command:
    """Where a command lives (``module:attribute``, a function or a Typer sub-app) and its
    summary line in ``bitplan --help``."""

    target: str
    summary: str

    def load(self, name: str) -> Any:
        """The command's click object, built by Typer from its function or sub-app."""
        module, _, attribute = self.target.partition(":")
        target = getattr(importlib.import_module(module), attribute)
        if isinstance(target, typer.Typer):
            group = typer.main.get_group(target)
            group.name = name
            return group
        single = typer.Typer(add_completion=False)
        single.command(name, short_help=self.summary)(target)
        return typer.main.get_command(single)


_PKG = "bitplan.app.commands"
COMMANDS = {
    "formats": Command(f"{_PKG}.formats:formats", "Format names and their bits per weight."),
    "analyze": Command(f"{_PKG}.planning:analyze", "Per-layer sensitivity of a model."),
    "search": Command(f"{_PKG}.planning:search", "Size/quality frontier and plans under a budget."),
    "solve": Command(f"{_PKG}.planning:solve", "Exact frontier of a sensitivity table."),
    "apply": Command(f"{_PKG}.apply:apply", "Quantize a model per a plan for a runtime (--to)."),
    "db": Command(f"{_PKG}.server:db_app", "The service database: upgrade."),
    "keys": Command(f"{_PKG}.server:keys_app", "The service's API keys: create, list, revoke."),
    "serve": Command(f"{_PKG}.server:serve", "Run the REST service and its workers."),
    "worker": Command(f"{_PKG}.server:worker", "Run one worker of the service's job queue."),
    "submit": Command(f"{_PKG}.submit:submit", "Queue a planning job on a service."),
    "status": Command(f"{_PKG}.jobs:status", "A job's state, stage and progress."),
    "wait": Command(f"{_PKG}.jobs:wait", "Wait for a job with a progress bar."),
    "cancel": Command(f"{_PKG}.jobs:cancel", "Cancel a job."),
    "download": Command(f"{_PKG}.jobs:download", "Save a finished job's results."),
    "model": Command(f"{_PKG}.jobs:model", "Save a job's plan applied to its model (--to)."),
    "demo": Command(f"{_PKG}.demo:demo", "The whole service locally, on a builtin model."),
}


class _LazyGroup(TyperGroup):
    """The root group: lists :data:`COMMANDS` by their summaries and loads a command when it
    is resolved (to run it, or to show its help), not before."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Until loaded, a command is a placeholder that only knows its name and summary.
        for name, command in COMMANDS.items():
            self.commands[name] = TyperCommand(name, short_help=command.summary)
        self._loaded: set[str] = set()

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name = args[0] if args else None
        if name in COMMANDS and name not in self._loaded:
            self.commands[name] = COMMANDS[name].load(name)
            self._loaded.add(name)
        return super().resolve_command(ctx, args)


app = typer.Typer(
    name="bitplan",
    cls=_LazyGroup,
    no_args_is_help=True,
    add_completion=False,
    help="Mixed-precision quantization planning: per-layer sensitivity, "
    "exact size/quality frontiers, per-layer plans.",
)


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    setup_logging(verbose)
    if not verbose:
        quiet_third_party()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
