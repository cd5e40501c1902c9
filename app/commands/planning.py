"""``analyze``, ``search`` and ``solve``: planning on this machine.

Each command is a thin shell around the library function the service's worker calls too
(:func:`~bitplan.search.pipeline.analyze_spec`, :func:`~bitplan.search.pipeline.run_job`,
:func:`~bitplan.search.solve.solve_table`), so the CLI and the service cannot drift apart. The
library (torch, pandas, Optuna) is imported inside the commands, so ``bitplan --help`` stays
fast. A failed command removes the output folder it created; Ctrl-C exits 130, and a search
stopped by Ctrl-C first writes the frontier of the trials it finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bitplan.app.commands._options import (
    DEFAULT_FORMATS,
    DEFAULT_ROUNDING,
    BudgetOpt,
    CalibOpt,
    ExcludeOpt,
    FormatsOpt,
    FuseOpt,
    HoldoutOpt,
    MaxLengthOpt,
    MaxSamplesOpt,
    MethodOpt,
    ModelArg,
    OutOpt,
    PinOpt,
    RoundingOpt,
    SamplerOpt,
    SeedOpt,
    TaskOpt,
    TimeoutOpt,
    TrialsOpt,
    parse_fuse,
    request_fields,
)
from bitplan.app.console import (
    CTRL_C_EXIT,
    console,
    ctrl_c_watch,
    output_folder,
    progress_bars,
    run_command,
)
from bitplan.app.spec_defaults import spec_default, spec_help

if TYPE_CHECKING:
    from bitplan.search.spec import JobSpec

__all__ = ["analyze", "search", "solve"]

DeviceOpt = Annotated[str, typer.Option(help=spec_help("device"))]
BatchSizeOpt = Annotated[int, typer.Option(help=spec_help("batch_size"))]
BlockwiseOpt = Annotated[
    bool,
    typer.Option(
        help="Read the model one transformer block at a time from disk, for a decoder LM "
        "(llama, mistral, qwen2, gpt2) larger than memory; needs --method layer. The table is "
        "the whole-model one; search measures every plan end-to-end, streamed block by block."
    ),
]


def _job_spec(**fields: object) -> JobSpec:
    from bitplan.search.spec import JobSpec

    return JobSpec(**fields)


def _fit_allocator(model: str) -> None:
    """Freed tensors back to the system at once for a large checkpoint (bitplan.app.allocator)."""
    from bitplan.app.allocator import return_freed_memory_for

    return_freed_memory_for(model)


def _cache_dir() -> Path:
    """The sensitivity cache shared by CLI runs (BITPLAN_CACHE_DIR overrides)."""
    from bitplan.sensitivity.models import resolve_cache_dir

    return resolve_cache_dir()


def analyze(
    model: ModelArg,
    out: OutOpt,
    calib: CalibOpt = spec_default("calib"),
    task: TaskOpt = spec_default("task"),
    formats: FormatsOpt = DEFAULT_FORMATS,
    rounding: RoundingOpt = DEFAULT_ROUNDING,
    method: MethodOpt = spec_default("method"),
    exclude: ExcludeOpt = None,
    pin: PinOpt = None,
    device: DeviceOpt = spec_default("device"),
    max_length: MaxLengthOpt = spec_default("max_length"),
    max_samples: MaxSamplesOpt = spec_default("max_samples"),
    holdout: HoldoutOpt = spec_default("holdout"),
    batch_size: BatchSizeOpt = spec_default("batch_size"),
    seed: SeedOpt = spec_default("seed"),
    blockwise: BlockwiseOpt = False,
) -> None:
    """Measure each layer's sensitivity to each format; write sensitivity.csv and layers.json."""

    def run() -> None:
        from bitplan.app.summary import sensitivity_table
        from bitplan.search.pipeline import analyze_spec
        from bitplan.search.spec import ANALYZE_BUDGET

        spec = _job_spec(
            model=model,
            budget=ANALYZE_BUDGET,
            **request_fields(
                calib=calib,
                task=task,
                formats=formats,
                rounding=rounding,
                method=method,
                exclude=exclude,
                pin=pin,
                device=device,
                max_length=max_length,
                max_samples=max_samples,
                holdout=holdout,
                batch_size=batch_size,
                seed=seed,
            ),
        )
        _fit_allocator(spec.model)
        with output_folder(out), progress_bars() as progress:
            table = analyze_spec(
                spec, out_dir=out, cache_dir=_cache_dir(), progress=progress, blockwise=blockwise
            )
        console.print(sensitivity_table(table, method=spec.method))
        console.print(f"wrote {out / 'sensitivity.csv'} and {out / 'layers.json'}")

    run_command(run)


def search(
    model: ModelArg,
    budget: BudgetOpt,
    out: OutOpt,
    calib: CalibOpt = spec_default("calib"),
    task: TaskOpt = spec_default("task"),
    formats: FormatsOpt = DEFAULT_FORMATS,
    rounding: RoundingOpt = DEFAULT_ROUNDING,
    method: MethodOpt = spec_default("method"),
    trials: TrialsOpt = spec_default("trials"),
    timeout: TimeoutOpt = spec_default("timeout"),
    seed: SeedOpt = spec_default("seed"),
    sampler: SamplerOpt = spec_default("sampler"),
    exclude: ExcludeOpt = None,
    pin: PinOpt = None,
    fuse: FuseOpt = None,
    device: DeviceOpt = spec_default("device"),
    max_length: MaxLengthOpt = spec_default("max_length"),
    max_samples: MaxSamplesOpt = spec_default("max_samples"),
    holdout: HoldoutOpt = spec_default("holdout"),
    batch_size: BatchSizeOpt = spec_default("batch_size"),
    blockwise: BlockwiseOpt = False,
) -> None:
    """Find the size/quality Pareto frontier under BUDGET and write a plan for every point."""

    def run() -> None:
        from bitplan.app.report import render_report
        from bitplan.app.summary import (
            fallback_note,
            frontier_table,
            plans_written,
            proxy_gap_note,
        )
        from bitplan.search.pipeline import run_job
        from bitplan.search.stage_stats import format_stages
        from bitplan.sensitivity.table import read_table

        spec = _job_spec(
            model=model,
            budget=budget,
            **request_fields(
                calib=calib,
                task=task,
                formats=formats,
                rounding=rounding,
                method=method,
                trials=trials,
                timeout=timeout,
                seed=seed,
                sampler=sampler,
                exclude=exclude,
                pin=pin,
                fuse=parse_fuse(fuse),
                device=device,
                max_length=max_length,
                max_samples=max_samples,
                holdout=holdout,
                batch_size=batch_size,
            ),
        )
        _fit_allocator(spec.model)
        with output_folder(out), ctrl_c_watch() as ctrl_c, progress_bars() as progress:
            result = run_job(
                spec, out_dir=out, cache_dir=_cache_dir(), progress=progress, blockwise=blockwise
            )
        console.print(frontier_table(result.frontier))
        console.print(format_stages(result.stages), highlight=False, soft_wrap=True)
        notes = (
            fallback_note(read_table(out / "sensitivity.csv"), method=spec.method),
            proxy_gap_note(result.proxy_gap),
        )
        for note in notes:
            if note is not None:
                console.print(note, highlight=False, soft_wrap=True)
        if result.interrupted:
            console.print(
                "[yellow]search stopped early: the frontier holds the trials that finished[/yellow]"
            )
        report = render_report(out)
        written = plans_written(result.frontier, out / "plans", best_plan_id=result.best_plan_id)
        console.print(
            f"wrote {result.frontier_path}, {written}, and the report {report}",
            highlight=False,
            soft_wrap=True,
        )
        if ctrl_c():
            raise typer.Exit(code=CTRL_C_EXIT)

    run_command(run)


def solve(
    table: Annotated[
        Path,
        typer.Argument(
            help="Sensitivity CSV: layer, format, error[, bytes][, numel][, tie][, group]."
        ),
    ],
    out: OutOpt,
    budget: Annotated[str | None, typer.Option(help="4.5bpw, 60MB, 58MiB or 0.3x.")] = None,
    points: Annotated[
        int | None,
        typer.Option(help="Frontier points to write as plans (default: the solver's own)."),
    ] = None,
) -> None:
    """Exact proxy frontier of a sensitivity table (no model needed), with a plan per point."""

    def run() -> None:
        from bitplan.app.summary import plans_written
        from bitplan.search.solve import DEFAULT_POINTS, solve_table

        with output_folder(out), progress_bars(transient=True) as progress:
            result = solve_table(
                table,
                budget=budget,
                out_dir=out,
                points=DEFAULT_POINTS if points is None else points,
                progress=progress,
            )
        console.print(
            f"{len(result.frontier)} Pareto-optimal plans "
            f"({'exact' if result.frontier.exact else 'thinned'}); "
            f"wrote {plans_written(result.file, out / 'plans', best_plan_id=result.best_plan_id)}",
            highlight=False,
            soft_wrap=True,
        )
        if result.best_plan_id is not None:
            best = next(p for p in result.file.points if p.plan_id == result.best_plan_id)
            console.print(
                f"best under {budget}: {best.plan_id} ({best.total_bytes} bytes, "
                f"{best.bpw:.3f} bpw, predicted error {best.predicted_error:.4g})"
            )

    run_command(run)
