"""The exact frontier against brute force, and the knapsack's ties, pins, exclusions and caps."""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitplan.search.budgets import parse_budget
from bitplan.search.frontier import best_under, budget_headroom, exact_frontier, planned_cap
from bitplan.search.points import choice_names
from bitplan.search.problem import LayerRow, Problem, build_problem
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import parse_format, tensor_bytes
from bitplan.sensitivity.layers import QuantLayer

FORMATS = ("int8", "int6-g128", "int4-g128", "int3-g64", "int2-g32-asym")


def _problem(options: list[list[tuple[int, int]]], *, unplanned: int = 0) -> Problem:
    """One layer per entry of ``options``, each option ``(bytes, error)`` in its own format."""
    rows, layers = [], []
    for i, opts in enumerate(options):
        sizes = {}
        for fmt, (nbytes, err) in zip(FORMATS, opts, strict=False):
            rows.append({"layer": f"l{i}", "format": fmt, "error": float(err)})
            sizes[parse_format(fmt)] = nbytes
        layers.append(LayerRow(name=f"l{i}", param=f"l{i}.weight", numel=64, table_bytes=sizes))
    return build_problem(
        pd.DataFrame(rows), layers, unplanned_bytes=unplanned, fp16_bytes=128 * len(options)
    )


def _brute_force(problem: Problem) -> list[tuple[int, float]]:
    """Pareto set of every combination: fewer bytes wins ties in error and vice versa."""
    combos = {
        (
            sum(int(g.bytes[i]) for g, i in zip(problem.groups, pick, strict=True)),
            sum(float(g.error[i]) for g, i in zip(problem.groups, pick, strict=True)),
        )
        for pick in itertools.product(*(range(len(g.formats)) for g in problem.groups))
    }
    front, best = [], math.inf
    for nbytes, err in sorted(combos):
        if err < best:
            front.append((nbytes, err))
            best = err
    return front


_option = st.tuples(st.integers(1, 40), st.integers(0, 30))
_instances = st.lists(st.lists(_option, min_size=1, max_size=4), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(_instances)
def test_frontier_equals_brute_force(options: list[list[tuple[int, int]]]) -> None:
    # Integer-valued errors keep sums exact, so ties in error (the tricky case) are common.
    problem = _problem(options)
    frontier = exact_frontier(problem)
    assert list(zip(frontier.bytes.tolist(), frontier.error.tolist(), strict=True)) == _brute_force(
        problem
    )
    assert frontier.exact
    for i in range(len(frontier)):
        point = frontier.point(i)
        assert problem.cost(point.choice) == (point.planned_bytes, point.predicted_error)


@settings(max_examples=60, deadline=None)
@given(_instances, st.integers(0, 200))
def test_best_under_is_brute_force_best_and_never_exceeds(
    options: list[list[tuple[int, int]]], cap: int
) -> None:
    problem = _problem(options)
    fits = [(e, b) for b, e in _brute_force(problem) if b <= cap]
    best = best_under(exact_frontier(problem), cap)
    if not fits:
        assert best is None
    else:
        assert best is not None and best.planned_bytes <= cap
        assert (best.predicted_error, best.planned_bytes) == min(fits)
        assert best.source == "exact" and best.number == exact_frontier(problem).index_under(cap)


def _tied_table() -> tuple[pd.DataFrame, list[QuantLayer]]:
    layers = [
        QuantLayer(
            name="emb",
            param="emb.weight",
            kind="embedding",
            shape=(256, 64),
            numel=256 * 64,
            tie="emb.weight",
        ),
        QuantLayer(name="fc", param="fc.weight", kind="linear", shape=(32, 64), numel=32 * 64),
        QuantLayer(
            name="head",
            param="emb.weight",
            kind="linear",
            shape=(256, 64),
            numel=256 * 64,
            tie="emb.weight",
        ),
    ]
    errors = {"emb": (0.1, 1.0), "fc": (0.2, 3.0), "head": (0.4, 5.0)}
    rows = [
        {"layer": name, "format": fmt, "error": err}
        for name, errs in errors.items()
        for fmt, err in zip(("int8", "int2-g32-asym"), errs, strict=True)
    ]
    return pd.DataFrame(rows), layers


def test_tie_group_counts_bytes_once_and_sums_errors() -> None:
    table, layers = _tied_table()
    problem = build_problem(table, layers, unplanned_bytes=0, fp16_bytes=1)
    tie = next(g for g in problem.groups if g.key == "emb.weight")
    assert tie.members == ["emb", "head"]
    assert tie.numel == 256 * 64 and problem.planned_numel == 256 * 64 + 32 * 64
    int8 = tie.formats.index(parse_format("int8"))
    assert tie.bytes[int8] == tensor_bytes(parse_format("int8"), 256, 64)
    assert tie.error[int8] == pytest.approx(0.5)
    frontier = exact_frontier(problem)
    smallest = frontier.point(0)
    assert choice_names(smallest.choice) == {"emb.weight": "int2-g32-asym", "fc": "int2-g32-asym"}
    assert smallest.predicted_error == pytest.approx(9.0)
    assert len(frontier) == 4  # 2 decisions x 2 formats, all Pareto-optimal here


def test_pins_leave_one_option() -> None:
    table, layers = _tied_table()
    layers[1] = QuantLayer(**{**layers[1].__dict__, "pinned": "int8"})
    problem = build_problem(table, layers, unplanned_bytes=0, fp16_bytes=1)
    frontier = exact_frontier(problem)
    assert {frontier.point(i).choice["fc"] for i in range(len(frontier))} == {parse_format("int8")}
    assert len(frontier) == 2
    uniform = problem.uniform_choice(parse_format("int2-g32-asym"))
    assert uniform is not None
    assert choice_names(uniform) == {"emb.weight": "int2-g32-asym", "fc": "int8"}


def test_pin_to_unmeasured_format_costs_its_bytes() -> None:
    table, layers = _tied_table()
    layers[1] = QuantLayer(**{**layers[1].__dict__, "pinned": "fp16"})
    problem = build_problem(table, layers, unplanned_bytes=0, fp16_bytes=1)
    fc = next(g for g in problem.groups if g.key == "fc")
    assert fc.formats == [parse_format("fp16")] and fc.bytes.tolist() == [32 * 64 * 2]
    assert fc.error.tolist() == [0.0]


def test_rows_of_excluded_layers_are_ignored() -> None:
    table, layers = _tied_table()
    problem = build_problem(table, layers[:2] + [], unplanned_bytes=7, fp16_bytes=1)
    assert [g.key for g in problem.groups] == ["emb.weight", "fc"]
    assert exact_frontier(problem).point(0).planned_bytes == sum(
        int(g.bytes.min()) for g in problem.groups
    )
    assert problem.unplanned_bytes == 7


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda t: t.assign(error=t["error"].where(t.index != 0, float("nan"))), "finite"),
        (lambda t: pd.concat([t, t.iloc[:1]]), "two rows"),
        (lambda t: t[t["layer"] != "fc"], "no format"),
    ],
)
def test_bad_tables_are_input_errors(change, needle: str) -> None:
    table, layers = _tied_table()
    with pytest.raises(InputError, match=needle):
        build_problem(change(table), layers, unplanned_bytes=0, fp16_bytes=1)


def test_infeasible_budget_names_smallest_size_and_bounds() -> None:
    table, layers = _tied_table()
    layers[1] = QuantLayer(**{**layers[1].__dict__, "pinned": "int8"})
    problem = build_problem(table, layers, unplanned_bytes=1000, fp16_bytes=10**6)
    floor = sum(int(g.bytes.min()) for g in problem.groups)
    with pytest.raises(InputError) as info:
        planned_cap(problem, parse_budget("1kB"))
    message = str(info.value)
    assert f"{floor + 1000} bytes" in message
    assert f"{(floor + 1000) / 1000:.3f}kB" in message
    assert "1000 bytes of unplanned" in message
    assert "fc=int8" in message and "tie groups emb.weight (2 layers" in message
    assert "largest minimum-size layers emb.weight" in message
    bpw = 8 * floor / problem.planned_numel
    with pytest.raises(InputError, match=f"{bpw:.3f}bpw"):
        planned_cap(problem, parse_budget("1bpw"))
    assert planned_cap(problem, parse_budget(f"{floor + 1000}B")) == floor


def test_thinning_is_flagged_and_keeps_both_ends(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    options = [
        [
            (int(b), int(e))
            for b, e in zip(
                sorted(rng.integers(1, 10**6, 4)),
                sorted(rng.integers(0, 10**6, 4))[::-1],
                strict=True,
            )
        ]
        for _ in range(8)
    ]
    problem = _problem(options)
    full = exact_frontier(problem)
    assert len(full) > 40
    with caplog.at_level(logging.WARNING, logger="bitplan.search.frontier"):
        thin = exact_frontier(problem, max_points=40)
    assert not thin.exact and "no longer exact" in caplog.text
    assert len(thin) < len(full)
    assert (thin.bytes[0], thin.error[-1]) == (full.bytes[0], full.error[-1])
    assert np.all(np.diff(thin.bytes) > 0) and np.all(np.diff(thin.error) < 0)
    for i in range(len(thin)):
        point = thin.point(i)
        assert problem.cost(point.choice) == (point.planned_bytes, point.predicted_error)


def test_spread_covers_both_ends() -> None:
    problem = _problem([[(1, 9), (5, 4), (9, 1)]] * 4)
    frontier = exact_frontier(problem)
    picks = frontier.spread(4)
    assert picks[0] == 0 and picks[-1] == len(frontier) - 1 and len(picks) == 4
    assert frontier.spread(100) == list(range(len(frontier)))


def test_spread_gives_exactly_n_distinct_points_where_targets_collide() -> None:
    """Byte targets evenly spaced over a frontier with one far outlier all land on the dense
    cluster's few points; the spread still returns n distinct points, kept ones included."""
    problem = _problem([[(1, 9), (2, 8), (3, 7), (4, 6), (1000, 0)]])
    frontier = exact_frontier(problem)
    assert len(frontier) == 5
    for n in range(1, 6):
        picks = frontier.spread(n, keep=[2] if n >= 3 else [])
        assert len(picks) == n == len(set(picks))
        assert picks[-1] == len(frontier) - 1 or n == 1
        assert n < 3 or 2 in picks
    with pytest.raises(ValueError, match="keep"):
        frontier.spread(1, keep=[0, 1])


def test_budget_headroom_only_when_everything_fits() -> None:
    problem = _problem([[(1, 9), (5, 4), (9, 1)]] * 2)
    assert budget_headroom(problem, parse_budget("17B"), 17) is None
    note = budget_headroom(problem, parse_budget("1MB"), 1_000_000)
    assert note is not None and "everything fits" in note and "18 bytes" in note
