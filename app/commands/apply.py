"""``bitplan apply``: a model quantized per a plan, written as bit-packed safetensors.

The command is :func:`bitplan.apply` (the Python API) with a one-line summary, so scripts and the
command line pack a model the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bitplan.app.commands._paths import OutOpt
from bitplan.app.console import console, output_folder, run_command

__all__ = ["apply"]


def apply(
    model: Annotated[str, typer.Argument(help="The model the plan was made for.")],
    plan: Annotated[Path, typer.Argument(help="A bitplan.plan/v1 JSON file.")],
    out: OutOpt,
    device: Annotated[
        str | None,
        typer.Option(help="auto, cpu or cuda (default: bitplan.apply's, the CPU)."),
    ] = None,
) -> None:
    """Write MODEL quantized per PLAN as bit-packed safetensors (bytes equal the plan's)."""

    def run() -> None:
        import bitplan

        parsed = bitplan.load_plan(path=plan)
        options: dict[str, Any] = {} if device is None else {"device": device}
        with output_folder(out):
            report = bitplan.apply(model=model, plan=parsed, out_dir=out, **options)
        console.print(
            f"wrote {report.path}: {report.total_bytes} tensor bytes "
            f"(plan total_bytes {parsed.totals.total_bytes})",
            highlight=False,
        )

    run_command(run)
