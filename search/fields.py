"""Pydantic field types shared by the request and the plan models: formats as parsed objects.

A format travels through bitplan as a :class:`~bitplan.sensitivity.format_spec.QuantFormat`
(bits, group size and symmetry at hand, parsed once) and crosses every JSON boundary as its name
(``"int4-g128"``), so the files and the REST API keep the strings of DESIGN §3. :data:`Format`
is that bridge: pydantic parses a name (or accepts a parsed format) on the way in and writes the
canonical name on the way out; a bad name fails with the parser's message.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema

from bitplan.sensitivity.format_spec import ROUNDINGS, QuantFormat, parse_format

__all__ = ["Format", "Rounding", "as_format"]

# How weights are rounded onto a format's grid (a plan layer's ``rounding``, a job's options).
Rounding = Literal["rtn", "gptq", "awq", "hqq"]
if get_args(Rounding) != ROUNDINGS:  # pragma: no cover - a guard against editing one list
    raise ImportError("Rounding drifted from format_spec.ROUNDINGS")


def as_format(value: object) -> QuantFormat:
    """A :class:`QuantFormat` from a format name or a parsed format (anything else: TypeError)."""
    if isinstance(value, QuantFormat):
        return value
    if isinstance(value, str):
        return parse_format(value)
    raise TypeError(f"a format is a name such as 'int4-g128', got {type(value).__name__}")


def _validate(value: object) -> QuantFormat:
    # pydantic reports a ValueError as a field error (a TypeError would escape as a crash).
    try:
        return as_format(value)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def _name(fmt: QuantFormat) -> str:
    return fmt.name


Format = Annotated[
    QuantFormat,
    PlainValidator(_validate),  # not Before: the dataclass schema would leak into OpenAPI
    PlainSerializer(_name, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "description": "fp32, bf16, fp16, fp8-e4m3, int{b}[-g{G}][-asym] or a llama.cpp "
            "block format (q8_0 … q2_k)",
            "examples": ["int4-g128"],
        }
    ),
]
