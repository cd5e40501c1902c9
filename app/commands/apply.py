"""``bitplan apply``: a model quantized per a plan, written for a runtime (``--to``).

The command is :func:`bitplan.apply` (the Python API) with a one-line summary, so scripts and the
command line write the same files. The targets and their help come from
:data:`~bitplan.search.targets.TARGETS`, so a new target needs no change here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bitplan.app.commands._paths import OutOpt
from bitplan.app.console import console, output_folder, run_command
from bitplan.search.targets import DEFAULT_TARGET, TARGETS, target_writer

__all__ = ["apply"]

_TO_HELP = "Where the model goes: " + "; ".join(
    f"{t.name}: {t.description}" for t in TARGETS.values()
)


def apply(
    model: Annotated[str, typer.Argument(help="The model the plan was made for.")],
    plan: Annotated[Path, typer.Argument(help="A bitplan.plan/v1 JSON file.")],
    out: OutOpt,
    to: Annotated[str, typer.Option("--to", help=_TO_HELP)] = DEFAULT_TARGET,
    device: Annotated[
        str | None,
        typer.Option(help="auto, cpu or cuda (default: bitplan.apply's, the CPU)."),
    ] = None,
    rounding_stats: Annotated[
        Path | None,
        typer.Option(
            "--rounding-stats",
            help="The job folder whose rounding-stats-*.safetensors round the plan's gptq/awq "
            "layers (default: the folder above the plan's plans/).",
        ),
    ] = None,
) -> None:
    """Write MODEL quantized per PLAN for a runtime: bit-packed safetensors whose bytes equal
    the plan's (--to bitplan, the default), a Hugging Face folder for transformers + torchao
    (--to torchao), one model.gguf for llama.cpp (--to gguf) or a compressed-tensors folder
    for vLLM and transformers (--to compressed-tensors). The last three need bitplan's
    "runtimes" extra (torchao, gguf, compressed-tensors, llama-cpp-python)."""

    def run() -> None:
        import bitplan

        target_writer(to)  # an unknown target or missing runtime packages: said before the plan
        parsed = bitplan.load_plan(path=plan)
        options: dict[str, Any] = {} if device is None else {"device": device}
        # By default a plan file under <job>/plans/ is rounded with that job's statistics.
        options["rounding_stats"] = rounding_stats or plan.expanduser().resolve().parent.parent
        with output_folder(out):
            report = bitplan.apply(model=model, plan=parsed, out_dir=out, to=to, **options)
        where = report.path if to == DEFAULT_TARGET else out
        console.print(
            f"wrote {where}: {report.total_bytes} tensor bytes "
            f"(plan total_bytes {parsed.totals.total_bytes})",
            highlight=False,
        )

    run_command(run)
