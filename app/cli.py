"""The ``bitplan`` command line: the root Typer app and the list of its commands.

Each command is a module-level function (or a Typer sub-app) in a small module of
:mod:`bitplan.app.commands`; this file only assembles them, so the whole CLI can be read here:

- planning on this machine: ``formats``, ``analyze``, ``search``, ``solve``, ``apply``;
- the service, as its operator: ``db upgrade``, ``keys create``, ``serve``, ``worker``;
- a job on a service: ``submit``, ``status``, ``wait``, ``cancel``, ``download``; ``demo``.

Starting the CLI imports no torch, pandas, Optuna, SQLAlchemy or HTTP client: commands import
what they use when they run, so ``bitplan --help`` and ``bitplan status`` start at once.
Bad input prints one line and exits with code 2; Ctrl-C exits with code 130.
"""

from __future__ import annotations

from typing import Annotated

import typer

from bitplan.app.commands import apply, demo, formats, jobs, planning, server
from bitplan.app.console import quiet_third_party, setup_logging

__all__ = ["app", "main"]

app = typer.Typer(
    name="bitplan",
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


app.command("formats")(formats.formats)
app.command("analyze")(planning.analyze)
app.command("search")(planning.search)
app.command("solve")(planning.solve)
app.command("apply")(apply.apply)
app.add_typer(server.db_app, name="db")
app.add_typer(server.keys_app, name="keys")
app.command("serve")(server.serve)
app.command("worker")(server.worker)
app.command("submit")(jobs.submit)
app.command("status")(jobs.status)
app.command("wait")(jobs.wait)
app.command("cancel")(jobs.cancel)
app.command("download")(jobs.download)
app.command("demo")(demo.demo)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
