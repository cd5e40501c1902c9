"""One merge of the exact frontier against brute force, on chains large enough for every path.

The fast merge proves blocks of candidates dominated and merges the rest as units; none of that
may lose or add a point. Brute force here is the definition: every sum, sorted by bytes then
error, kept when its error is below every cheaper sum's. Small block sizes are patched in so
that a few hundred points exercise several levels of proofs, overlapping blocks and ties.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitplan.search import _frontier_bounds, _frontier_merge
from bitplan.search._frontier_merge import merge_group
from bitplan.search._frontier_runs import Runs
from bitplan.search._frontier_scratch import Scratch
from bitplan.search.frontier import exact_frontier
from bitplan.search.problem import LayerRow, Problem, build_problem
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import parse_format


def _pareto(nbytes: np.ndarray, err: np.ndarray) -> tuple[list[int], list[float]]:
    """The Pareto set of the sums, by definition."""
    order = np.lexsort((err, nbytes))
    kept_b: list[int] = []
    kept_e: list[float] = []
    best = np.inf
    for i in order:
        if err[i] < best:
            kept_b.append(int(nbytes[i]))
            kept_e.append(float(err[i]))
            best = err[i]
    return kept_b, kept_e


def _chain(rng: np.random.Generator, n: int, *, step: int, integer: bool) -> tuple[np.ndarray, ...]:
    """A strict chain: bytes rising by 1..step, errors falling, jagged (random drops), as
    integers (so that sums tie often) or floats."""
    nbytes = np.cumsum(rng.integers(1, step + 1, n)).astype(np.int64)
    drops = rng.integers(1, 50, n) if integer else rng.exponential(1.0, n) + 1e-3
    err = (np.cumsum(drops[::-1])[::-1] - (60.0 if integer else 0.0)).astype(np.float64)
    return nbytes, err


def _options(
    rng: np.random.Generator, k: int, *, step: int, integer: bool
) -> tuple[np.ndarray, ...]:
    """A pruned group: bytes rising, errors falling."""
    nbytes, err = _chain(rng, k, step=step, integer=integer)
    return nbytes, err


@contextmanager
def _blocks(leaf: int, top: int, fan: int) -> Iterator[None]:
    """Small proof blocks and no textbook shortcut, so that small chains take every path."""
    with (
        mock.patch.object(_frontier_bounds, "LEAF", leaf),
        mock.patch.object(_frontier_bounds, "TOP", top),
        mock.patch.object(_frontier_bounds, "FAN", fan),
        mock.patch.object(_frontier_merge, "_SMALL", 0),
    ):
        yield


def _check(cur: tuple[np.ndarray, ...], opts: tuple[np.ndarray, ...]) -> None:
    """The merge equals brute force, and every point's back-pointer rebuilds its sum."""
    merged = merge_group(*cur, *opts)
    sums_b = (opts[0][:, None] + cur[0][None, :]).ravel()  # (k*n,)
    sums_e = (opts[1][:, None] + cur[1][None, :]).ravel()  # (k*n,)
    want_b, want_e = _pareto(sums_b, sums_e)
    assert merged.bytes.tolist() == want_b
    assert merged.error.tolist() == want_e
    parent, option = merged.runs.expand(len(merged.bytes))
    assert np.array_equal(cur[0][parent] + opts[0][option], merged.bytes)
    assert np.array_equal(opts[1][option] + cur[1][parent], merged.error)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 400),
    k=st.integers(1, 12),
    step=st.sampled_from([1, 3, 50, 10_000]),
    integer=st.booleans(),
    shape=st.sampled_from([(2, 2, 2), (4, 2, 4), (8, 4, 4), (16, 2, 2)]),
)
def test_block_merge_equals_brute_force(
    seed: int, n: int, k: int, step: int, integer: bool, shape: tuple[int, int, int]
) -> None:
    # Small steps make many sums of different chains equal in bytes (ties in the units), and
    # integer errors make equal errors common; both must come out as brute force has them.
    rng = np.random.default_rng(seed)
    cur = _chain(rng, n, step=step, integer=integer)
    opts = _options(rng, k, step=step * 20, integer=integer)
    with _blocks(*shape):
        _check(cur, opts)


@pytest.mark.parametrize("parallel", [False, True])
def test_block_merge_on_smooth_frontiers(parallel: bool) -> None:
    """A convex frontier with a little noise, as many groups make, and options whose trade-off
    (nearly) equals its local slope for a long stretch: chains that interleave point by point,
    where block proofs must fail and units must be cut into points."""
    rng = np.random.default_rng(7)
    n = 3000
    nbytes = np.cumsum(rng.integers(900, 1100, n)).astype(np.int64)
    err = 1e6 / (1.0 + nbytes / nbytes[-1] * 40) + rng.uniform(0, 5, n)
    err = np.minimum.accumulate(err) - np.arange(n) * 1e-3  # strictly falling
    slope = (err[1600] - err[1400]) / (nbytes[1600] - nbytes[1400])
    opt_b = np.array([0, 50_000, 100_000, 400_000], dtype=np.int64)
    opt_e = np.array([9e3, 9e3 + slope * 50_000, 9e3 + slope * 100_000, 9e3 + slope * 200_000])
    assert np.all(np.diff(opt_e) < 0)
    if not parallel:
        opt_e[1:3] += np.array([-40.0, -30.0])
    with _blocks(16, 8, 4):
        _check((nbytes, err), (opt_b, opt_e))
    _check((nbytes, err), (opt_b, opt_e))  # the real block sizes


def test_sums_that_round_to_equal_errors_keep_the_cheaper() -> None:
    """Errors far below an option's error's precision round to equal sums along a chain: of
    equal errors the fewest bytes win, as brute force has it."""
    rng = np.random.default_rng(11)
    n = 400
    nbytes = np.cumsum(rng.integers(1, 4, n)).astype(np.int64)
    err = np.cumsum(rng.uniform(1e-17, 3e-16, n)[::-1])[::-1]  # falling, below 1.0's ulp
    opts = (np.array([0, 7, 300], dtype=np.int64), np.array([2.0, 1.0, 0.5]))
    assert len(np.unique(err + 1.0)) < n  # the case at hand: sums of one chain tie
    with _blocks(4, 2, 4):
        _check((nbytes, err), opts)


def test_merge_outputs_stay_valid_for_the_next_merge() -> None:
    """With scratch buffers, a merge's output is the next merge's input: chained merges equal
    merges made without scratch memory."""
    rng = np.random.default_rng(3)
    groups = [_options(rng, 6, step=400, integer=False) for _ in range(6)]
    cur = _chain(rng, 300, step=20, integer=False)
    plain, shared = cur, cur
    scratch = Scratch()
    with _blocks(8, 4, 2):
        for opts in groups:
            plain_m = merge_group(*plain, *opts)
            shared_m = merge_group(*shared, *opts, scratch=scratch)
            plain = (plain_m.bytes, plain_m.error)
            shared = (shared_m.bytes, shared_m.error)
            assert np.array_equal(plain[0], shared[0]) and np.array_equal(plain[1], shared[1])


def test_runs_round_trip_and_select() -> None:
    parent = np.array([5, 6, 7, 0, 1, 9, 9, 10])
    option = np.array([1, 1, 1, 1, 1, 0, 2, 2])
    runs = Runs.of(parent, option)
    assert runs.start.tolist() == [0, 3, 5, 6]  # a break where the option or the parent jumps
    got_parent, got_option = runs.expand(len(parent))
    assert got_parent.tolist() == parent.tolist() and got_option.tolist() == option.tolist()
    assert [runs.locate(i) for i in range(len(parent))] == list(
        zip(parent.tolist(), option.tolist(), strict=True)
    )
    keep = np.array([0, 2, 6, 7])
    picked = runs.select(keep, len(parent))
    assert picked.expand(len(keep))[0].tolist() == parent[keep].tolist()
    stored = runs.stored(np.array([4, 2, 9]))
    assert stored.expand(len(parent))[1].tolist() == [2, 2, 2, 2, 2, 4, 9, 9]
    assert stored.option.dtype.itemsize == 1 and stored.parent.dtype == np.int32


def _layer_problem(n_layers: int, seed: int) -> Problem:
    """Layers with four formats each, random byte sizes and integer errors (exact sums)."""
    rng = np.random.default_rng(seed)
    formats = ("int8", "int6-g128", "int4-g128", "int2-g32-asym")
    rows, layers = [], []
    for i in range(n_layers):
        sizes = np.sort(rng.integers(1, 5_000, len(formats)))[::-1]
        errors = np.sort(rng.integers(0, 1_000, len(formats)))
        table_bytes = {}
        for fmt, nbytes, err in zip(formats, sizes, errors, strict=True):
            rows.append({"layer": f"l{i}", "format": fmt, "error": float(err)})
            table_bytes[parse_format(fmt)] = int(nbytes)
        layers.append(
            LayerRow(name=f"l{i}", param=f"l{i}.weight", numel=64, table_bytes=table_bytes)
        )
    return build_problem(pd.DataFrame(rows), layers, unplanned_bytes=0, fp16_bytes=1)


def test_exact_frontier_is_the_same_through_block_merges() -> None:
    problem = _layer_problem(40, seed=5)
    with mock.patch.object(_frontier_merge, "_SMALL", 10**12):
        textbook = exact_frontier(problem, max_points=None)
    with _blocks(8, 4, 4):
        blocks = exact_frontier(problem, max_points=None)
    assert len(blocks) > 1000  # large enough for many block merges
    assert np.array_equal(blocks.bytes, textbook.bytes)
    assert np.array_equal(blocks.error, textbook.error)
    for i in np.linspace(0, len(blocks) - 1, 25).astype(int):
        point = blocks.point(int(i))
        assert problem.cost(point.choice) == (point.planned_bytes, point.predicted_error)


def test_max_points_none_never_thins_and_bad_caps_are_input_errors() -> None:
    problem = _layer_problem(12, seed=2)
    full = exact_frontier(problem, max_points=None)
    assert full.exact and np.array_equal(full.bytes, exact_frontier(problem).bytes)
    with pytest.raises(InputError, match="at least 2"):
        exact_frontier(problem, max_points=1)
