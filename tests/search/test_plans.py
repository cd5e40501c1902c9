"""Plan files: totals by the byte rules, round trips, validation; frontier files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bitplan.search.budgets import parse_budget
from bitplan.search.plans import (
    BEST_PLAN_ID,
    FRONTIER_SCHEMA,
    PLAN_SCHEMA,
    FrontierPoint,
    Plan,
    make_plan,
    plan_id_of,
    read_frontier,
    read_plan,
    write_frontier,
)
from bitplan.search.problem import LayerRow
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import QuantFormat, parse_format, tensor_bytes
from bitplan.sensitivity.layers import QuantLayer

LAYERS = [
    QuantLayer(
        name="emb",
        param="emb.weight",
        kind="embedding",
        shape=(100, 48),
        numel=4800,
        tie="emb.weight",
    ),
    QuantLayer(name="fc", param="fc.weight", kind="linear", shape=(30, 48), numel=1440),
    QuantLayer(
        name="head",
        param="emb.weight",
        kind="linear",
        shape=(100, 48),
        numel=4800,
        tie="emb.weight",
    ),
]
CHOICE = {"emb.weight": "int4-g32", "fc": "int3-g64-asym"}


def _parsed(choice: dict[str, str]) -> dict[str, QuantFormat]:
    return {group: parse_format(name) for group, name in choice.items()}


def _plan(**overrides) -> Plan:
    """A plan of LAYERS; ``choice`` is given by format names."""
    if "choice" in overrides:
        overrides["choice"] = _parsed(overrides["choice"])
    args = {
        "model_ref": "builtin:toy",
        "model_sha256": "ab" * 32,
        "layers": LAYERS,
        "choice": _parsed(CHOICE),
        "budget": parse_budget("4.5bpw"),
        "unplanned_bytes": 500,
        "fp16_bytes": 2 * (4800 + 1440) + 500,
        "predicted_error": 0.25,
    }
    return make_plan(**{**args, **overrides})


def test_totals_follow_the_byte_rules() -> None:
    plan = _plan()
    emb = tensor_bytes(parse_format("int4-g32"), 100, 48)
    fc = tensor_bytes(parse_format("int3-g64-asym"), 30, 48)
    t = plan.totals
    assert t.planned_bytes == emb + fc  # the tied tensor once
    assert t.total_bytes == emb + fc + 500
    assert t.bpw == pytest.approx(8 * (emb + fc) / (4800 + 1440))
    assert t.ratio_vs_fp16 == pytest.approx((emb + fc + 500) / (2 * 6240 + 500))
    assert [lay.bytes for lay in plan.layers] == [emb, fc, emb]
    head = plan.layers[2]
    assert head.format == parse_format("int4-g32")  # parsed once, written as its name
    assert (head.bits, head.group_size, head.symmetric) == (4, 32, True)
    assert plan.to_dict()["layers"][2]["format"] == "int4-g32"
    assert plan.choice() == _parsed(CHOICE)


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    plan = _plan(metrics={"calibration": {"error": 0.3}, "holdout": {"accuracy": 0.9}})
    path = plan.write(tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert data["schema"] == PLAN_SCHEMA
    assert data["budget"] == {"kind": "bpw", "value": 4.5}
    assert data["layers"][0]["shape"] == [100, 48]
    assert set(data["layers"][0]) == {
        "name",
        "param",
        "kind",
        "shape",
        "numel",
        "tie",
        "group",
        "format",
        "rounding",
        "bits",
        "group_size",
        "symmetric",
        "bytes",
    }
    assert data["metrics"] == {
        "predicted_error": 0.25,
        "calibration": {"error": 0.3},
        "holdout": {"accuracy": 0.9},
    }
    again = read_plan(path)
    assert again == plan
    assert again.to_dict() == data


def _broken(edit) -> dict:
    data = _plan().to_dict()
    edit(data)
    return data


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda d: d.update(schema="bitplan.plan/v2"), "unsupported plan schema 'bitplan.plan/v2'"),
        (lambda d: d["layers"][0].update(format="int7"), "int7"),
        (lambda d: d["layers"][1].update(bits=8), "do not match format"),
        (lambda d: d["layers"][1].update(bytes=1), "takes"),
        (
            lambda d: d["layers"][2].update(
                format="int8",
                bits=8,
                group_size=None,
                bytes=tensor_bytes(parse_format("int8"), 100, 48),
            ),
            "two formats",
        ),
        (
            lambda d: d["totals"].update(planned_bytes=d["totals"]["planned_bytes"] + 1),
            "totals.planned_bytes",
        ),
        (lambda d: d["totals"].update(bpw=4.0), "totals.bpw"),
        (lambda d: d["totals"].update(total_bytes=1), "totals.total_bytes"),
        (lambda d: d.pop("layers"), "layers: Field required"),
        (lambda d: d.update(budget={"kind": "watts", "value": 3}), "budget.kind: Input should be"),
        (lambda d: d["layers"][0].update(colour="red"), "colour: Extra inputs"),
        (lambda d: d["layers"][0].update(format=4), "a format is a name"),
    ],
)
def test_validation_errors(edit, needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        Plan.from_dict(_broken(edit))


# A share group: separate q/k/v tensors (v is smaller, as with grouped-query attention) that
# take one format, each with its own bytes, next to a tie group.
SHARED = [
    *LAYERS,
    *(
        QuantLayer(
            name=f"attn.{n}",
            param=f"attn.{n}.weight",
            kind="linear",
            shape=(rows, 48),
            numel=rows * 48,
            share="attn.qkv",
        )
        for n, rows in (("q_proj", 48), ("k_proj", 48), ("v_proj", 16))
    ),
]


def _shared_plan(fmt: str = "int4-g32") -> Plan:
    return _plan(layers=SHARED, choice={**CHOICE, "attn.qkv": fmt})


def test_share_group_members_keep_their_own_bytes_and_one_format(tmp_path: Path) -> None:
    plan = _shared_plan()
    fmt = parse_format("int4-g32")
    members = [lay for lay in plan.layers if lay.share == "attn.qkv"]
    assert [lay.format for lay in members] == [fmt] * 3
    assert [lay.bytes for lay in members] == [tensor_bytes(fmt, r, 48) for r in (48, 48, 16)]
    assert plan.totals.planned_bytes == _plan().totals.planned_bytes + sum(
        lay.bytes for lay in members
    )
    assert plan.totals.bpw == pytest.approx(
        8 * plan.totals.planned_bytes / (4800 + 1440 + (48 + 48 + 16) * 48)
    )
    assert plan.choice()["attn.qkv"] == fmt and "attn.q_proj" not in plan.choice()
    data = plan.to_dict()
    assert [lay["group"] for lay in data["layers"]] == [None] * 3 + ["attn.qkv"] * 3
    assert read_plan(plan.write(tmp_path / "p.json")) == plan


def test_a_plan_without_group_fields_still_reads() -> None:
    """Plans written before share groups existed have no ``group`` field."""
    data = _plan().to_dict()
    for lay in data["layers"]:
        del lay["group"]
    plan = Plan.from_dict(data)
    assert plan == _plan() and all(lay.share is None for lay in plan.layers)


def _retyped(layer: dict, name: str) -> None:
    fmt = parse_format(name)
    layer.update(
        format=name,
        bits=fmt.bits,
        group_size=fmt.group_size,
        symmetric=fmt.symmetric,
        bytes=tensor_bytes(fmt, *layer["shape"]),
    )


def test_a_plan_that_breaks_a_share_group_is_refused() -> None:
    data = _shared_plan().to_dict()
    v_proj = data["layers"][-1]
    _retyped(v_proj, "int8")
    planned = sum(lay["bytes"] for lay in data["layers"]) - data["layers"][2]["bytes"]
    data["totals"].update(  # consistent totals: only the broken group is wrong
        planned_bytes=planned,
        total_bytes=planned + 500,
        bpw=8 * planned / (4800 + 1440 + 112 * 48),
        ratio_vs_fp16=(planned + 500) / data["totals"]["fp16_bytes"],
    )
    with pytest.raises(InputError, match="share group attn.qkv has two formats") as caught:
        Plan.from_dict(data)
    assert "attn.q_proj: int4-g32" in str(caught.value)
    assert "attn.v_proj: int8" in str(caught.value)


def test_a_tie_split_across_share_groups_is_refused() -> None:
    data = _plan().to_dict()
    data["layers"][2]["group"] = "other"  # head, tied to emb, in a share group of its own
    with pytest.raises(InputError, match="tie group emb.weight is split across groups"):
        Plan.from_dict(data)


def test_read_plan_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_plan(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not JSON"):
        read_plan(tmp_path / "bad.json")


def test_make_plan_rejects_incomplete_or_foreign_choices() -> None:
    with pytest.raises(InputError, match="no format for fc"):
        _plan(choice={"emb.weight": "int8"})
    with pytest.raises(InputError, match="does not have: nope"):
        _plan(choice={**CHOICE, "nope": "int8"})


def test_table_rows_without_shapes_take_bytes_from_the_table() -> None:
    int4 = parse_format("int4-g128")
    rows = [
        LayerRow(name="a", param="a.weight", numel=1000, table_bytes={int4: 530}),
        LayerRow(name="b", param="b.weight", numel=3000, table_bytes={int4: 1590}),
    ]
    plan = make_plan(
        model_ref="table:t.csv",
        model_sha256="0" * 64,
        layers=rows,
        choice={"a": int4, "b": int4},
        budget=None,
        unplanned_bytes=0,
        fp16_bytes=8000,
        predicted_error=None,
    )
    assert plan.totals.planned_bytes == 2120 and plan.totals.bpw == pytest.approx(4.24)
    assert plan.layers[0].shape is None and plan.layers[0].kind is None
    assert Plan.from_dict(plan.to_dict()) == plan


def test_frontier_file_round_trip(tmp_path: Path) -> None:
    small = _plan(
        choice={"emb.weight": "int2-g32-asym", "fc": "int2-g32-asym"},
        metrics={"holdout": {"error": 0.5}},
    )
    big = _plan(metrics={"calibration": {"error": 0.1}, "holdout": {"error": 0.2}})
    uniform = _plan(choice={"emb.weight": "int8", "fc": "int8"})
    written = write_frontier(
        tmp_path,
        model_ref="builtin:toy",
        model_sha256="ab" * 32,
        budget=parse_budget("4.5bpw"),
        points=[(big, "search"), (small, "exact")],
        uniform=[(uniform, "uniform:int8")],
        best=big,
    )
    data = json.loads((tmp_path / "frontier.json").read_text())
    assert data["schema"] == FRONTIER_SCHEMA
    ids = [p["plan_id"] for p in data["points"]]
    assert ids == [plan_id_of(small), plan_id_of(big)]  # smallest first
    assert ids[0].startswith(f"{small.totals.bpw:.2f}bpw-")
    # exactly the listed plans are written, plus best.json: a copy of the best plan
    names = sorted(path.stem for path in (tmp_path / "plans").glob("*.json"))
    assert names == sorted([*ids, "u-int8", BEST_PLAN_ID])
    best_text = (tmp_path / "plans" / f"{BEST_PLAN_ID}.json").read_text()
    assert best_text == (tmp_path / "plans" / f"{ids[1]}.json").read_text()
    assert data["points"][1]["metrics"] == {
        "calibration": {"error": 0.1},
        "holdout": {"error": 0.2},
    }
    assert data["points"][1]["source"] == "search"
    assert data["uniform"][0]["plan_id"] == "u-int8"
    for point in data["points"] + data["uniform"]:
        assert read_plan(tmp_path / point["plan"]).totals.total_bytes == point["total_bytes"]
    assert read_frontier(tmp_path / "frontier.json") == written
    csv_lines = (tmp_path / "frontier.csv").read_text().splitlines()
    assert csv_lines[0].split(",")[:5] == [
        "plan_id",
        "source",
        "total_bytes",
        "bpw",
        "predicted_error",
    ]
    assert "holdout_error" in csv_lines[0] and len(csv_lines) == 4
    (tmp_path / "frontier.json").write_text(json.dumps({**data, "schema": "x/v9"}))
    with pytest.raises(InputError, match="unsupported frontier file schema"):
        read_frontier(tmp_path / "frontier.json")


def test_plan_id_depends_on_the_choice_only() -> None:
    """One plan, one id: measured metrics, budget or the other points found do not move it."""
    plain = _plan()
    measured = _plan(metrics={"calibration": {"error": 0.3}})
    other = _plan(choice={"emb.weight": "int8", "fc": "int8"})
    assert plan_id_of(plain) == plan_id_of(measured)
    assert plan_id_of(plain) != plan_id_of(other)
    assert plan_id_of(other).startswith(f"{other.totals.bpw:.2f}bpw-")


def test_best_must_be_one_of_the_points(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one of the frontier's points"):
        write_frontier(
            tmp_path,
            model_ref="builtin:toy",
            model_sha256="ab" * 32,
            budget=None,
            points=[(_plan(), "exact")],
            best=_plan(),  # equal content, but not a listed point
        )


def test_frontier_point_rejects_unknown_source_and_bad_id() -> None:
    good = {
        "plan_id": "u-int8",
        "total_bytes": 10,
        "bpw": 8.0,
        "predicted_error": None,
        "metrics": {"holdout": {"error": 0.1}},
        "plan": "plans/u-int8.json",
        "source": "uniform:int8",
    }
    point = FrontierPoint.model_validate(good)
    assert point.holdout == {"error": 0.1} and point.calibration == {}
    with pytest.raises(ValueError, match="unknown point source"):
        FrontierPoint.model_validate({**good, "source": "guess"})
    with pytest.raises(ValueError, match="plan_id"):
        FrontierPoint.model_validate({**good, "plan_id": "../etc"})


def test_plan_and_frontier_modules_import_without_torch() -> None:
    """The REST API uses these models as response models: reading a plan needs no torch."""
    code = (
        "import sys\n"
        "from bitplan.search import plans, spec\n"
        "heavy = [m for m in ('torch', 'pandas', 'numpy', 'optuna') if m in sys.modules]\n"
        "assert plans.Plan and spec.JobSpec and not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
