"""``bitplan formats``: the format names bitplan accepts, with their real bits per weight."""

from __future__ import annotations

import inspect
from typing import Annotated

import typer

from bitplan.app.console import console
from bitplan.sensitivity.format_spec import (
    ALLOWED_BITS,
    FLOAT_BYTES,
    GGML_TYPES,
    QuantFormat,
    parse_format,
)

__all__ = ["formats"]

# The group sizes listed (any G >= 1 works): the common ones of GPTQ/AWQ-style checkpoints.
_LISTED_GROUPS = (128, 64, 32)
# The row length QuantFormat.bits_per_weight assumes unless told (a typical hidden size).
_COLS = inspect.signature(QuantFormat.bits_per_weight).parameters["cols"].default


def _listed_names() -> list[str]:
    names = [*FLOAT_BYTES, "fp8-e4m3"]
    for bits in sorted(ALLOWED_BITS, reverse=True):
        names.append(f"int{bits}")
        for group in _LISTED_GROUPS:
            names += [f"int{bits}-g{group}", f"int{bits}-g{group}-asym"]
    return names + list(GGML_TYPES)


def formats(
    cols: Annotated[int, typer.Option(help="Row length used for bits per weight.")] = _COLS,
) -> None:
    """List the formats bitplan accepts, with bits per weight (scales included)."""
    from rich.table import Table

    table = Table("format", "bits", "group", "symmetric", f"bpw (cols={cols})")
    for name in _listed_names():
        fmt = parse_format(name)
        group = "-" if fmt.kind == "float" else str(fmt.group_size or "row")
        table.add_row(
            name,
            str(fmt.bits),
            group,
            "yes" if fmt.symmetric else "no",
            f"{fmt.bits_per_weight(cols):.3f}" if fmt.applies_to(cols) else "-",
        )
    console.print(table)
    console.print(
        "Any group size G ≥ 1 works: int{b}-g{G}[-asym], b in "
        f"{{{','.join(map(str, ALLOWED_BITS))}}}. q…_0/_1/_k are llama.cpp's block formats "
        "(group = block); a row they do not fit takes llama.cpp's fallback."
    )
