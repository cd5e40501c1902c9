"""A job's roundings: every int format becomes one planning option per rounding; the CLI and the
REST request carry the list unchanged."""

from __future__ import annotations

import pytest

from bitplan.app.commands._options import request_fields
from bitplan.app.schemas import JobCreate
from bitplan.search.spec import JobSpec
from bitplan.sensitivity.errors import InputError


def test_int_formats_become_one_option_per_rounding_and_others_stay_nearest() -> None:
    spec = JobSpec(
        model="builtin:tiny-lm",
        budget="4bpw",
        formats=["fp16", "int4-g32", "q4_0", "int2-g16-asym"],
        rounding=["rtn", "gptq", "hqq"],
    )
    assert [f.name for f in spec.options] == [
        "fp16",
        "int4-g32",
        "int4-g32+gptq",
        "int4-g32+hqq",
        "q4_0",
        "int2-g16-asym",
        "int2-g16-asym+gptq",
        "int2-g16-asym+hqq",
    ]
    assert JobSpec(**spec.to_dict()) == spec
    assert [f.name for f in JobSpec(model="m", budget="4bpw").options] == [
        f.name for f in JobSpec(model="m", budget="4bpw").formats
    ]


@pytest.mark.parametrize(
    ("rounding", "says"),
    [(["gptq", "gptq"], "listed twice"), (["best"], "rounding"), ([], "rounding")],
)
def test_bad_roundings_are_refused_with_the_field_named(rounding: list[str], says: str) -> None:
    with pytest.raises(InputError, match=says):
        JobSpec(model="m", budget="4bpw", rounding=rounding)


def test_the_cli_and_the_rest_request_carry_the_roundings() -> None:
    fields = request_fields(formats="int4-g32", exclude=None, pin=None, rounding=" RTN, awq ")
    assert fields["rounding"] == ["rtn", "awq"]
    request = JobCreate(model="builtin:tiny-lm", budget="4bpw", rounding=["rtn", "gptq"])
    spec = request.to_spec(model=None, dataset=None)
    assert spec.rounding == ["rtn", "gptq"]
    with pytest.raises(ValueError, match="rounding"):
        JobCreate(model="builtin:tiny-lm", budget="4bpw", rounding=["nearest"])
