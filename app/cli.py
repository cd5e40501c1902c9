"""The ``bitplan`` command line: analyze, solve, search, apply, formats (and the service commands).

Every command is a thin shell around library functions that the service worker calls too, so
the CLI and the service cannot drift apart. Bad input prints one line and exits with code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from bitplan.app.console import console, exit_on_input_error, progress_bars, setup_logging
from bitplan.app.service_cli import register as register_service_commands
from bitplan.search.spec import METHODS, JobSpec
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import ALLOWED_BITS, DEFAULT_FORMATS, parse_format

app = typer.Typer(
    name="bitplan",
    no_args_is_help=True,
    add_completion=False,
    help="Mixed-precision quantization planning: per-layer sensitivity, "
    "exact size/quality frontiers, per-layer plans.",
)

FormatsOpt = Annotated[
    str, typer.Option("--formats", "-f", help="Comma-separated candidate formats.")
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude", help="fnmatch pattern of layer names to leave unquantized (repeatable)."
    ),
]
PinOpt = Annotated[
    list[str] | None,
    typer.Option("--pin", help="PATTERN=FORMAT: force matching layers to a format (repeatable)."),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]
ModelArg = Annotated[str, typer.Argument(help="builtin:NAME, a Hugging Face folder or .zip.")]
CalibOpt = Annotated[str, typer.Option(help="builtin, or a .txt/.jsonl/.safetensors file.")]
TaskOpt = Annotated[str | None, typer.Option(help="Override the inferred task.")]
MethodOpt = Annotated[str, typer.Option(help=f"One of {', '.join(METHODS)}.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
MaxLengthOpt = Annotated[int, typer.Option(help="Max tokens per text sample.")]
MaxSamplesOpt = Annotated[int | None, typer.Option(help="Use at most N samples.")]
HoldoutOpt = Annotated[float, typer.Option(help="Fraction held out for validation.")]
BatchSizeOpt = Annotated[int, typer.Option(help="Samples per forward pass.")]


def parse_pins(pins: list[str] | None) -> dict[str, str]:
    """``["attn.*=int8", …]`` → ``{"attn.*": "int8"}``, with a clear error for bad items."""
    result: dict[str, str] = {}
    for item in pins or []:
        pattern, sep, fmt = item.partition("=")
        if not sep or not pattern or not fmt:
            raise InputError(f"--pin expects PATTERN=FORMAT, got {item!r}")
        result[pattern.strip()] = parse_format(fmt).name
    return result


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    setup_logging(verbose)


@app.command("formats")
def formats_cmd(
    cols: Annotated[int, typer.Option(help="Row length used for bits per weight.")] = 4096,
) -> None:
    """List the formats bitplan accepts, with bits per weight (scales included)."""
    table = Table("format", "bits", "group", "symmetric", f"bpw (cols={cols})")
    names = ["fp32", "bf16", "fp16", "fp8-e4m3"]
    for bits in sorted(ALLOWED_BITS, reverse=True):
        for suffix in ("", "-g128", "-g64", "-g32"):
            names.append(f"int{bits}{suffix}")
            if suffix:
                names.append(f"int{bits}{suffix}-asym")
    for name in names:
        fmt = parse_format(name)
        group = "-" if fmt.kind == "float" else str(fmt.group_size or "row")
        table.add_row(
            name,
            str(fmt.bits),
            group,
            "yes" if fmt.symmetric else "no",
            f"{fmt.bits_per_weight(cols):.3f}",
        )
    console.print(table)
    console.print(
        "Any group size G ≥ 1 works: int{b}-g{G}[-asym], b in "
        f"{{{','.join(map(str, ALLOWED_BITS))}}}."
    )


def _cache_dir() -> Path:
    """The sensitivity cache shared by CLI runs (BITPLAN_CACHE_DIR overrides)."""
    from bitplan.sensitivity.models import resolve_cache_dir

    return resolve_cache_dir()


def _spec(**kwargs: object) -> JobSpec:
    return JobSpec(**kwargs)  # type: ignore[arg-type]


@app.command("analyze")
def analyze_cmd(
    model: ModelArg,
    out: OutOpt,
    calib: CalibOpt = "builtin",
    task: TaskOpt = None,
    formats: FormatsOpt = ",".join(DEFAULT_FORMATS),
    method: MethodOpt = "fisher",
    exclude: ExcludeOpt = None,
    pin: PinOpt = None,
    device: DeviceOpt = "auto",
    max_length: MaxLengthOpt = 128,
    max_samples: MaxSamplesOpt = None,
    holdout: HoldoutOpt = 0.25,
    batch_size: BatchSizeOpt = 32,
) -> None:
    """Measure each layer's sensitivity to each format; write sensitivity.csv and layers.json."""
    from bitplan.app.summary import sensitivity_table
    from bitplan.search.pipeline import analyze_spec

    def run() -> None:
        spec = _spec(
            model=model,
            budget="16bpw",
            calib=calib,
            task=task,
            formats=formats.split(","),
            method=method,
            exclude=list(exclude or []),
            pins=parse_pins(pin),
            device=device,
            max_length=max_length,
            max_samples=max_samples,
            holdout=holdout,
            batch_size=batch_size,
        )
        with progress_bars() as progress:
            table = analyze_spec(spec, out_dir=out, cache_dir=_cache_dir(), progress=progress)
        console.print(sensitivity_table(table))
        console.print(f"wrote {out / 'sensitivity.csv'} and {out / 'layers.json'}")

    exit_on_input_error(run)


@app.command("search")
def search_cmd(
    model: ModelArg,
    budget: Annotated[str, typer.Option(help="4.5bpw, 60MB, 58MiB or 0.3x (of fp16 size).")],
    out: OutOpt,
    calib: CalibOpt = "builtin",
    task: TaskOpt = None,
    formats: FormatsOpt = ",".join(DEFAULT_FORMATS),
    method: MethodOpt = "fisher",
    trials: Annotated[int, typer.Option(help="Measured trials (seeds included).")] = 40,
    timeout: Annotated[float | None, typer.Option(help="Stop the search after S seconds.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the split and the sampler.")] = 0,
    sampler: Annotated[str, typer.Option(help="nsga2 or tpe.")] = "nsga2",
    exclude: ExcludeOpt = None,
    pin: PinOpt = None,
    device: DeviceOpt = "auto",
    max_length: MaxLengthOpt = 128,
    max_samples: MaxSamplesOpt = None,
    holdout: HoldoutOpt = 0.25,
    batch_size: BatchSizeOpt = 32,
) -> None:
    """Find the size/quality Pareto frontier under BUDGET and write a plan for every point."""
    from bitplan.app.report import render_report
    from bitplan.app.summary import frontier_table
    from bitplan.search.pipeline import run_job
    from bitplan.search.plans import read_frontier

    def run() -> None:
        spec = _spec(
            model=model,
            budget=budget,
            calib=calib,
            task=task,
            formats=formats.split(","),
            method=method,
            trials=trials,
            timeout=timeout,
            seed=seed,
            sampler=sampler,
            exclude=list(exclude or []),
            pins=parse_pins(pin),
            device=device,
            max_length=max_length,
            max_samples=max_samples,
            holdout=holdout,
            batch_size=batch_size,
        )
        with progress_bars() as progress:
            result = run_job(spec, out_dir=out, cache_dir=_cache_dir(), progress=progress)
        console.print(frontier_table(read_frontier(result.frontier_path)))
        if result.interrupted:
            console.print(
                "[yellow]search stopped early: the frontier holds the trials that finished[/yellow]"
            )
        report = render_report(out)
        console.print(
            f"wrote {result.frontier_path}, {len(result.plan_ids)} plans in "
            f"{out / 'plans'} and the report {report}"
        )

    exit_on_input_error(run)


@app.command("solve")
def solve_cmd(
    table: Annotated[
        Path, typer.Argument(help="Sensitivity CSV: layer, format, error[, bytes][, numel][, tie].")
    ],
    out: OutOpt,
    budget: Annotated[str | None, typer.Option(help="4.5bpw, 60MB, 58MiB or 0.3x.")] = None,
    points: Annotated[int, typer.Option(help="Frontier points to write as plans.")] = 32,
) -> None:
    """Exact proxy frontier of a sensitivity table (no model needed), with a plan per point."""
    from bitplan.search.solve import solve_table

    def run() -> None:
        with progress_bars(transient=True) as progress:
            result = solve_table(
                table, budget=budget, out_dir=out, points=points, progress=progress
            )
        console.print(
            f"{len(result.frontier)} Pareto-optimal plans "
            f"({'exact' if result.frontier.exact else 'thinned'}); "
            f"wrote {len(result.file.points)} to {out / 'plans'}"
        )
        if result.best_plan_id is not None:
            best = next(p for p in result.file.points if p.plan_id == result.best_plan_id)
            console.print(
                f"best under {budget}: {best.plan_id} ({best.total_bytes} bytes, "
                f"{best.bpw:.3f} bpw, predicted error {best.predicted_error:.4g})"
            )

    exit_on_input_error(run)


@app.command("apply")
def apply_cmd(
    model: Annotated[str, typer.Argument(help="The model the plan was made for.")],
    plan: Annotated[Path, typer.Argument(help="A bitplan.plan/v1 JSON file.")],
    out: OutOpt,
    device: DeviceOpt = "cpu",
) -> None:
    """Write MODEL quantized per PLAN as bit-packed safetensors (bytes equal the plan's)."""
    from dataclasses import replace

    from bitplan.search.artifact import apply_plan
    from bitplan.search.plans import read_plan
    from bitplan.sensitivity.models import load_model

    def run() -> None:
        parsed = read_plan(plan)
        loaded = load_model(model, device=device)
        planned = {lay.name for lay in parsed.layers}
        loaded = replace(loaded, layers=[lay for lay in loaded.layers if lay.name in planned])
        report = apply_plan(model=loaded, plan=parsed.to_dict(), out_dir=out)
        console.print(
            f"wrote {report.path}: {report.total_bytes} tensor bytes "
            f"(plan total_bytes {parsed.totals.total_bytes})"
        )

    exit_on_input_error(run)


register_service_commands(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
