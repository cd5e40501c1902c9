"""Budget syntax, the planned-bytes cap it implies, and the sizes it reports back."""

from __future__ import annotations

import pytest

from bitplan.search.budgets import Budget, parse_budget
from bitplan.sensitivity.errors import InputError


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("4.5bpw", "bpw", 4.5),
        (" 3BPW ", "bpw", 3.0),
        ("60MB", "bytes", 60_000_000),
        ("58MiB", "bytes", 58 * 2**20),
        ("1.2GB", "bytes", 1_200_000_000),
        ("1.5GiB", "bytes", 3 * 2**29),
        ("512kB", "bytes", 512_000),
        ("2KiB", "bytes", 2048),
        ("1000B", "bytes", 1000),
        ("0.3x", "ratio", 0.3),
        (".25x", "ratio", 0.25),
    ],
)
def test_parse_accepted_forms(text: str, kind: str, value: float) -> None:
    budget = parse_budget(text)
    assert (budget.kind, budget.value, budget.text) == (kind, value, text.strip())


@pytest.mark.parametrize(
    "text", ["", "4.5", "bpw", "-1MB", "0x", "3 parsecs", "1e6B", "40bpw", "0.1B", "1.2.3GB"]
)
def test_parse_rejects_with_accepted_forms(text: str) -> None:
    with pytest.raises(InputError) as info:
        parse_budget(text)
    message = str(info.value)
    assert "accepted" in message and "bpw" in message and "MiB" in message
    assert "\n" not in message


def test_bpw_cap_counts_planned_weights_only() -> None:
    cap = parse_budget("4.5bpw").planned_cap(
        planned_numel=1001, unplanned_bytes=10**6, fp16_bytes=10**9
    )
    assert cap == 563  # floor(4.5 * 1001 / 8) = floor(563.06)
    assert 8 * cap / 1001 <= 4.5 < 8 * (cap + 1) / 1001


def test_bytes_cap_subtracts_unplanned() -> None:
    cap = parse_budget("1MiB").planned_cap(planned_numel=1, unplanned_bytes=48_576, fp16_bytes=1)
    assert cap == 2**20 - 48_576


def test_ratio_cap_is_exact_decimal() -> None:
    # 0.3 is not a binary float: 0.3 * 10 == 3.0000000000000004 would round one byte up.
    budget = parse_budget("0.3x")
    assert budget.planned_cap(planned_numel=1, unplanned_bytes=1, fp16_bytes=10) == 2
    assert (
        budget.planned_cap(planned_numel=1, unplanned_bytes=0, fp16_bytes=7 * 10**9) == 21 * 10**8
    )


def test_describe_uses_the_budgets_own_unit() -> None:
    sizes = {
        "planned_bytes": 3 * 2**20,
        "planned_numel": 2**23,
        "unplanned_bytes": 2**20,
        "fp16_bytes": 2**24,
    }
    assert parse_budget("4bpw").describe(**sizes) == "3.000bpw"
    assert parse_budget("5MiB").describe(**sizes) == "4.000MiB"
    assert parse_budget("5MB").describe(**sizes) == "4.194MB"
    assert parse_budget("0.5x").describe(**sizes) == "0.2500x"


def test_to_dict_matches_plan_schema() -> None:
    assert parse_budget("60MB").to_dict() == {"kind": "bytes", "value": 60_000_000}
    assert Budget(kind="bpw", value=4.5, text="4.5bpw").to_dict() == {"kind": "bpw", "value": 4.5}
