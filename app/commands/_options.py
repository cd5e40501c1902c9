"""Options shared by the commands that build a job (``analyze``, ``search``, ``submit``).

Every default and most help lines come from :class:`~bitplan.search.spec.JobSpec` (see
:mod:`bitplan.app.spec_defaults`), so the CLI, the REST API and the Python API agree on them.
:func:`request_fields` turns the options into JobSpec's fields (also the API's ``JobCreate``
fields), so each command builds its request the same way.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from bitplan.app.commands._paths import OutOpt
from bitplan.app.spec_defaults import spec_default, spec_help
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.format_spec import parse_format

__all__ = [
    "BudgetOpt",
    "CalibOpt",
    "DEFAULT_FORMATS",
    "ExcludeOpt",
    "DEFAULT_ROUNDING",
    "FormatsOpt",
    "FuseOpt",
    "HoldoutOpt",
    "MaxLengthOpt",
    "MaxSamplesOpt",
    "MethodOpt",
    "ModelArg",
    "OutOpt",
    "PinOpt",
    "SamplerOpt",
    "SeedOpt",
    "TaskOpt",
    "TimeoutOpt",
    "TrialsOpt",
    "parse_fuse",
    "parse_pins",
    "RoundingOpt",
    "request_fields",
]

# JobSpec's default formats as --formats writes them.
DEFAULT_FORMATS = ",".join(fmt.name for fmt in spec_default("formats"))

ModelArg = Annotated[str, typer.Argument(help="builtin:NAME, a Hugging Face folder or .zip.")]
BudgetOpt = Annotated[str, typer.Option(help="4.5bpw, 60MB, 58MiB or 0.3x (of the fp16 size).")]
CalibOpt = Annotated[str, typer.Option(help="builtin, or a .txt/.jsonl/.safetensors file.")]
TaskOpt = Annotated[str | None, typer.Option(help="Override the task inferred from the model.")]
FormatsOpt = Annotated[
    str, typer.Option("--formats", "-f", help=f"Comma-separated: {spec_help('formats')}")
]
MethodOpt = Annotated[str, typer.Option(help=spec_help("method"))]
RoundingOpt = Annotated[
    str, typer.Option("--rounding", help=f"Comma-separated: {spec_help('rounding')}")
]
# JobSpec's default roundings as --rounding writes them.
DEFAULT_ROUNDING = ",".join(spec_default("rounding"))
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(help="Repeatable: an fnmatch pattern of layers to leave unquantized."),
]
PinOpt = Annotated[
    list[str] | None,
    typer.Option("--pin", help="Repeatable PATTERN=FORMAT: force matching layers to a format."),
]
FuseOpt = Annotated[
    list[str] | None,
    typer.Option(help="Comma-separated or repeatable, e.g. qkv,gate_up: " + spec_help("fuse")),
]
TrialsOpt = Annotated[int, typer.Option(help=spec_help("trials"))]
TimeoutOpt = Annotated[float | None, typer.Option(help=spec_help("timeout"))]
SeedOpt = Annotated[int, typer.Option(help=spec_help("seed"))]
SamplerOpt = Annotated[str, typer.Option(help=spec_help("sampler"))]
HoldoutOpt = Annotated[float, typer.Option(help=spec_help("holdout"))]
MaxLengthOpt = Annotated[int, typer.Option(help=spec_help("max_length"))]
MaxSamplesOpt = Annotated[int | None, typer.Option(help=spec_help("max_samples"))]


def parse_pins(pins: list[str] | None) -> dict[str, str]:
    """``["attn.*=int8", …]`` → ``{"attn.*": "int8"}``, with a clear error for bad items."""
    result: dict[str, str] = {}
    for item in pins or []:
        pattern, sep, fmt = item.partition("=")
        if not sep or not pattern or not fmt:
            raise InputError(f"--pin expects PATTERN=FORMAT, got {item!r}")
        result[pattern.strip()] = parse_format(fmt).name
    return result


def parse_fuse(fuse: list[str] | None) -> list[str]:
    """``["qkv,gate_up"]`` or ``["qkv", "gate_up"]`` → ``["qkv", "gate_up"]``."""
    return [name.strip() for item in fuse or [] for name in item.split(",") if name.strip()]


def request_fields(
    *,
    formats: str,
    exclude: list[str] | None,
    pin: list[str] | None,
    rounding: str = DEFAULT_ROUNDING,
    **options: Any,
) -> dict[str, Any]:
    """The options as JobSpec fields: formats and roundings as lists, patterns as a list, pins as
    a dict; every other option passes through under its own name."""
    return {
        "formats": [name.strip() for name in formats.split(",") if name.strip()],
        "rounding": [name.strip().lower() for name in rounding.split(",") if name.strip()],
        "exclude": list(exclude or []),
        "pins": parse_pins(pin),
        **options,
    }
