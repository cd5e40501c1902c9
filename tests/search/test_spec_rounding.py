"""A job's roundings: every int format becomes one planning option per rounding; the CLI and the
REST request carry the list unchanged."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

import bitplan
from bitplan.app.commands._options import request_fields
from bitplan.app.schemas import JobCreate
from bitplan.search.plans import PLAN_ID_PATTERN, read_plan
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


def test_solve_names_uniform_rounded_plans_with_valid_ids(tmp_path: Path) -> None:
    """A table with rounded options re-solves: the uniform gptq plan is u-<format>-gptq."""
    rows = [
        {"layer": f"l{i}", "format": fmt, "rounding": r, "error": e * (i + 1), "numel": 4096}
        for i in range(3)
        for fmt, r, e in (
            ("int8", "rtn", 0.001),
            ("int4-g32", "rtn", 0.03),
            ("int4-g32", "gptq", 0.01),
        )
    ]
    table = tmp_path / "sensitivity.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    result = bitplan.solve(table=table, budget="6bpw", out_dir=tmp_path / "out")
    ids = set(result.plan_ids)
    assert "u-int4-g32-gptq" in ids and "u-int4-g32" in ids
    assert all(re.fullmatch(PLAN_ID_PATTERN, i) for i in ids)
    gptq = read_plan(tmp_path / "out" / "plans" / "u-int4-g32-gptq.json")
    assert {lay.rounding for lay in gptq.layers} == {"gptq"}
