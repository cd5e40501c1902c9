"""Share groups in the knapsack: one format per group, each tensor's own bytes, a tie once.

The reference is brute force over *layer* assignments: every layer in any format it has a
table row for, keeping those where share- and tie-group members agree, sized by summing each
distinct tensor's bytes straight from the byte rules. The problem's own group accounting is
never used to compute the expected answer.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitplan.search.budgets import parse_budget
from bitplan.search.frontier import exact_frontier, planned_cap
from bitplan.search.plans import make_plan, read_plan
from bitplan.search.problem import LayerRow, build_problem, rows_from_table
from bitplan.search.solve import solve_table
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import parse_format, tensor_bytes
from bitplan.sensitivity.layers import QuantLayer
from bitplan.sensitivity.table import read_table

FORMATS = ("int8", "int4-g32", "int2-g32-asym")


def _layer(name: str, rows: int, **kw: str) -> QuantLayer:
    param = kw.pop("param", f"{name}.weight")
    return QuantLayer(
        name=name, param=param, kind="linear", shape=(rows, 64), numel=rows * 64, **kw
    )


# a alone; q/k/v one share group (v smaller, as with grouped-query attention); a share group
# "mix" holding a tie group (emb and head store one tensor) and a separate layer x.
LAYERS = [
    _layer("a", 32),
    _layer("attn.q_proj", 64, share="attn.qkv"),
    _layer("attn.k_proj", 64, share="attn.qkv"),
    _layer("attn.v_proj", 16, share="attn.qkv"),
    _layer("emb", 48, tie="emb.weight", param="emb.weight", share="mix"),
    _layer("head", 48, tie="emb.weight", param="emb.weight", share="mix"),
    _layer("x", 8, share="mix"),
]
# v has no int4-g32 row (as a block format that does not divide its rows would have none):
# int4-g32 is then no option for q/k/v.
MISSING = {("attn.v_proj", "int4-g32")}


def _table(errors: list[int]) -> pd.DataFrame:
    cells = [(lay.name, fmt) for lay in LAYERS for fmt in FORMATS if (lay.name, fmt) not in MISSING]
    return pd.DataFrame(
        [
            {"layer": name, "format": fmt, "error": float(err)}
            for (name, fmt), err in zip(cells, errors, strict=True)
        ]
    )


def _brute_force(table: pd.DataFrame) -> list[tuple[int, float]]:
    """Pareto set over every per-layer assignment that keeps share and tie groups whole."""
    error = {(r.layer, r.format): r.error for r in table.itertuples()}
    options = [[f for f in FORMATS if (lay.name, f) in error] for lay in LAYERS]
    combos = set()
    for pick in itertools.product(*options):
        by_group: dict[str, set[str]] = {}
        for lay, fmt in zip(LAYERS, pick, strict=True):
            by_group.setdefault(lay.share or lay.tie or lay.name, set()).add(fmt)
        if any(len(formats) > 1 for formats in by_group.values()):
            continue
        tensors = {lay.param: (lay.shape, fmt) for lay, fmt in zip(LAYERS, pick, strict=True)}
        nbytes = sum(tensor_bytes(parse_format(f), *shape) for shape, f in tensors.values())
        err = sum(error[lay.name, f] for lay, f in zip(LAYERS, pick, strict=True))
        combos.add((nbytes, err))
    front, best = [], math.inf
    for nbytes, err in sorted(combos):
        if err < best:
            front.append((nbytes, err))
            best = err
    return front


_N_CELLS = len(LAYERS) * len(FORMATS) - len(MISSING)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=_N_CELLS, max_size=_N_CELLS))
def test_frontier_equals_brute_force_over_whole_groups(errors: list[int]) -> None:
    # Integer errors keep sums exact, so ties in error (the tricky case) are common.
    table = _table(errors)
    problem = build_problem(table, LAYERS, unplanned_bytes=0, fp16_bytes=1)
    frontier = exact_frontier(problem)
    got = list(zip(frontier.bytes.tolist(), frontier.error.tolist(), strict=True))
    assert got == _brute_force(table)
    for i in range(len(frontier)):
        point = frontier.point(i)
        plan = make_plan(
            model_ref="t",
            model_sha256="0" * 64,
            layers=LAYERS,
            choice=point.choice,
            budget=None,
            unplanned_bytes=0,
            fp16_bytes=1,
            predicted_error=point.predicted_error,
        )
        assert plan.totals.planned_bytes == point.planned_bytes  # the plan counts as the solver
        for share in ("attn.qkv", "mix"):
            assert len({lay.format for lay in plan.layers if lay.share == share}) == 1


def test_group_options_bytes_and_numel() -> None:
    problem = build_problem(_table([1] * _N_CELLS), LAYERS, unplanned_bytes=0, fp16_bytes=1)
    groups = {g.key: g for g in problem.groups}
    assert list(groups) == ["a", "attn.qkv", "mix"]
    qkv, mix = groups["attn.qkv"], groups["mix"]
    assert qkv.members == ["attn.q_proj", "attn.k_proj", "attn.v_proj"] and qkv.tensors == 3
    assert [f.name for f in qkv.formats] == ["int2-g32-asym", "int8"]  # no int4-g32 for v
    int8 = parse_format("int8")
    assert qkv.bytes[qkv.formats.index(int8)] == sum(
        tensor_bytes(int8, rows, 64) for rows in (64, 64, 16)
    )
    assert qkv.error[qkv.formats.index(int8)] == 3.0
    # the tied tensor once, plus x; its error counts every member (emb and head too)
    assert mix.tensors == 2 and mix.numel == (48 + 8) * 64
    assert mix.bytes[mix.formats.index(int8)] == tensor_bytes(int8, 48, 64) + tensor_bytes(
        int8, 8, 64
    )
    assert mix.error[mix.formats.index(int8)] == 3.0
    assert problem.planned_numel == (32 + 64 + 64 + 16 + 48 + 8) * 64


def test_a_uniform_format_one_member_cannot_store_is_dropped_and_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # One share group, rows of 256 and of 64 weights: q4_k (blocks of 256) fits the first only,
    # the second is measured in llama.cpp's fallback q5_0, so the group has no uniform q4_k.
    layers = [
        QuantLayer(name=n, param=f"{n}.weight", kind="linear", shape=(8, c), numel=8 * c, share="g")
        for n, c in (("wide", 256), ("narrow", 64))
    ]
    cells = [("wide", "q4_k"), ("wide", "q8_0"), ("narrow", "q5_0"), ("narrow", "q8_0")]
    table = pd.DataFrame([{"layer": n, "format": f, "error": 1.0} for n, f in cells])
    problem = build_problem(table, layers, unplanned_bytes=0, fp16_bytes=1)
    q8_0 = parse_format("q8_0")
    with caplog.at_level(logging.INFO, logger="bitplan.search.problem"):
        assert problem.uniform_choice(q8_0) == {"g": q8_0}
        assert caplog.text == ""
        assert problem.uniform_choice(parse_format("q4_k")) is None
    assert "no uniform q4_k baseline: group g has no q4_k option (its options: q8_0)" in (
        caplog.text
    )


def test_a_pin_on_one_member_pins_the_group_and_two_pins_must_agree() -> None:
    table = _table([1] * _N_CELLS)
    pinned = [
        lay if lay.name != "attn.k_proj" else QuantLayer(**{**lay.__dict__, "pinned": "int8"})
        for lay in LAYERS
    ]
    qkv = next(
        g
        for g in build_problem(table, pinned, unplanned_bytes=0, fp16_bytes=1).groups
        if g.key == "attn.qkv"
    )
    assert qkv.formats == [parse_format("int8")] and qkv.pinned == parse_format("int8")
    clash = [
        QuantLayer(**{**lay.__dict__, "pinned": "int2-g32-asym"})
        if lay.name == "attn.v_proj"
        else lay
        for lay in pinned
    ]
    with pytest.raises(InputError, match="attn.k_proj=int8, attn.v_proj=int2-g32-asym"):
        build_problem(table, clash, unplanned_bytes=0, fp16_bytes=1)


def test_pinned_format_outside_the_table_counts_zero_and_says_which_members(
    caplog: pytest.LogCaptureFixture,
) -> None:
    table = _table([1] * _N_CELLS)
    pinned = [
        QuantLayer(**{**lay.__dict__, "pinned": "int4-g32"}) if lay.name == "attn.q_proj" else lay
        for lay in LAYERS
    ]
    with caplog.at_level(logging.WARNING):
        problem = build_problem(table, pinned, unplanned_bytes=0, fp16_bytes=1)
    qkv = next(g for g in problem.groups if g.key == "attn.qkv")
    assert qkv.error.tolist() == [2.0]  # q and k measured; v has no int4-g32 row
    assert "does not measure for attn.v_proj" in caplog.text


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"attn.q_proj": {"share": "a"}}, "a names both a layer and a share group"),
        (
            {"emb": {"share": None}, "head": {"share": None}, "x": {"share": "emb.weight"}},
            "emb.weight names both a share group and a tie group",
        ),
        ({"head": {"share": "other"}}, "tie group emb.weight is split across groups mix and other"),
    ],
)
def test_ambiguous_grouping_is_refused(edit: dict[str, dict[str, str | None]], needle: str) -> None:
    layers = [QuantLayer(**{**lay.__dict__, **edit.get(lay.name, {})}) for lay in LAYERS]
    with pytest.raises(InputError, match=needle):
        build_problem(_table([1] * _N_CELLS), layers, unplanned_bytes=0, fp16_bytes=1)


def test_infeasible_budget_names_the_share_group() -> None:
    problem = build_problem(_table([1] * _N_CELLS), LAYERS, unplanned_bytes=0, fp16_bytes=1)
    with pytest.raises(InputError, match=r"share groups .*attn.qkv \(3 layers in one format"):
        planned_cap(problem, parse_budget("1bpw"))


def test_a_user_table_with_a_group_column(tmp_path: Path) -> None:
    """``group`` joins separate tensors (own bytes) in one format; ``tie`` keeps its meaning."""
    rows = []
    sizes = {"q": 4096, "k": 1024, "v": 1024, "o": 4096}
    for name, numel in sizes.items():
        for fmt, err in (("int8", 0.01), ("int4-g128", 0.2), ("int2-g64", 1.0)):
            rows.append(
                {
                    "layer": f"blk.{name}",
                    "format": fmt,
                    "error": err * (2 if name == "q" else 1),
                    "numel": numel,
                    "group": "blk.qkv" if name in "qkv" else "",
                }
            )
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    table = read_table(tmp_path / "t.csv")
    assert set(table["group"]) == {"blk.qkv", ""}
    layer_rows = {r.name: r for r in rows_from_table(table)}
    assert layer_rows["blk.k"].share == "blk.qkv" and layer_rows["blk.o"].share is None
    result = solve_table(tmp_path / "t.csv", budget="5bpw", out_dir=tmp_path / "o", points=4)
    assert result.plan_ids
    for plan_id in result.plan_ids:
        plan = read_plan(tmp_path / "o" / "plans" / f"{plan_id}.json")
        members = [lay for lay in plan.layers if lay.share == "blk.qkv"]
        assert len(members) == 3 and len({lay.format for lay in members}) == 1
        row = layer_rows["blk.k"]
        assert members[1].bytes == row.bytes_for(members[1].format)  # k's own bytes
        assert plan.totals.planned_bytes == sum(lay.bytes for lay in plan.layers)
    assert len({r.group for r in layer_rows.values()}) == 2


def test_layer_rows_carry_the_share_group() -> None:
    row = LayerRow.from_quant_layer(LAYERS[4])
    assert (row.share, row.tie, row.tensor_key, row.group) == (
        "mix",
        "emb.weight",
        "emb.weight",
        "mix",
    )


def test_solving_with_a_reference_plan_keeps_its_share_groups(tmp_path: Path) -> None:
    """``solve --like`` re-solves a job's table (which has no group column) with the plan's
    share groups, so its plans keep them."""
    int8 = parse_format("int8")
    ref = make_plan(
        model_ref="m",
        model_sha256="0" * 64,
        layers=LAYERS,
        choice={"a": int8, "attn.qkv": int8, "mix": int8},
        budget=None,
        unplanned_bytes=0,
        fp16_bytes=10**6,
        predicted_error=None,
    ).write(tmp_path / "ref.json")
    errors = [float(i % 7) for i in range(_N_CELLS)]
    table = _table(errors)
    table["numel"] = table["layer"].map({lay.name: lay.numel for lay in LAYERS})
    table.to_csv(tmp_path / "t.csv", index=False)
    result = solve_table(tmp_path / "t.csv", budget=None, out_dir=tmp_path / "o", like=ref)
    for plan_id in result.plan_ids:
        plan = read_plan(tmp_path / "o" / "plans" / f"{plan_id}.json")
        assert [lay.share for lay in plan.layers] == [lay.share for lay in LAYERS]
        for share in ("attn.qkv", "mix"):
            assert len({lay.format for lay in plan.layers if lay.share == share}) == 1
