"""JobSpec: the one request model, its defaults, round trip and one-line errors."""

from __future__ import annotations

import pytest

from bitplan.search.spec import JobSpec
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.format_spec import DEFAULT_FORMATS, parse_format


def test_round_trip_through_a_json_dict() -> None:
    spec = JobSpec(
        model="builtin:digits-cnn", budget=" 4bpw ", pins={"fc*": "INT8"}, fuse=["gate_up"]
    )
    data = spec.to_dict()
    assert data["formats"] == list(DEFAULT_FORMATS)  # names on the wire
    assert data["pins"] == {"fc*": "int8"} and data["budget"] == "4bpw"
    assert data["fuse"] == ["gate_up"] and JobSpec(model="m", budget="4bpw").fuse == []
    assert JobSpec(**data) == spec


def test_formats_are_parsed_once() -> None:
    spec = JobSpec(model="m", budget="4bpw", formats=["int4-g128", "fp8-e4m3"])
    assert spec.formats == [parse_format("int4-g128"), parse_format("fp8-e4m3")]
    assert spec.format_names == ["int4-g128", "fp8-e4m3"]
    assert spec.pin_names() == {}


def test_defaults_are_readable_from_the_class() -> None:
    fields = JobSpec.model_fields
    assert fields["trials"].default == 40 and fields["batch_size"].default == 32
    formats = fields["formats"].get_default(call_default_factory=True)
    assert [f.name for f in formats] == list(DEFAULT_FORMATS)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"trials": 0}, "trials: Input should be greater than or equal to 1, got 0"),
        ({"method": "magic"}, "method: unknown method 'magic'; accepted: weight"),
        ({"sampler": "grid"}, "sampler: unknown sampler 'grid'"),
        ({"formats": ["int7"]}, "formats.0: unsupported format 'int7'"),
        ({"formats": ["int8", "INT8"]}, "format listed twice: int8"),
        ({"formats": []}, "formats: List should have at least 1 item"),
        ({"pins": {"fc": "int9"}}, "pins.fc: unsupported format 'int9'"),
        ({"budget": "lots"}, "budget: cannot read budget 'lots'"),
        ({"holdout": 1.0}, "holdout: Input should be less than 1"),
        ({"timeout": 0}, "timeout: Input should be greater than 0"),
        ({"batch_size": 0}, "batch_size: Input should be greater than or equal to 1"),
        ({"trails": 3}, "trails: Extra inputs are not permitted"),
        ({"fuse": ["qkvo"]}, "fuse.0: Input should be 'qkv' or 'gate_up', got 'qkvo'"),
        ({"fuse": ["qkv", "qkv"]}, "fuse: fuse rule listed twice: qkv"),
        ({"fuse": ["qkv", "gate_up", "qkv"]}, "fuse: List should have at most 2 items"),
    ],
)
def test_bad_values_are_one_line_input_errors(change: dict[str, object], needle: str) -> None:
    with pytest.raises(InputError) as caught:
        JobSpec(**{"model": "m", "budget": "4bpw", **change})
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_a_spec_is_immutable() -> None:
    spec = JobSpec(model="m", budget="4bpw")
    with pytest.raises(ValueError, match="frozen"):
        spec.trials = 3  # type: ignore[misc]
