"""``bitplan demo``: the whole service on this machine, on a builtin model (see
:mod:`bitplan.app.demo`, which holds the demo's defaults)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bitplan.app.demo import DEMO_BUDGET, DEMO_MODEL, DEMO_OUT, DEMO_TRIALS

__all__ = ["demo"]


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = DEMO_OUT,
    model: Annotated[str, typer.Option(help="A builtin model.")] = DEMO_MODEL,
    budget: Annotated[str, typer.Option(help="The memory budget.")] = DEMO_BUDGET,
    trials: Annotated[int, typer.Option(min=1, help="Measured trials.")] = DEMO_TRIALS,
) -> None:
    """Run the whole service locally on a builtin model and download its results."""
    from bitplan.app.demo import run_demo
    from bitplan.app.service_cli import finished, guarded

    finished(guarded(lambda: run_demo(out_dir=out, model=model, budget=budget, trials=trials)))
