"""``solve_table`` end to end on user CSVs, with and without a bytes column."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from bitplan.search.plans import make_plan, read_frontier, read_plan
from bitplan.search.problem import estimated_bytes, rows_from_table
from bitplan.search.solve import solve_table
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import parse_format
from bitplan.sensitivity.table import read_table

# layer -> {format: (bytes, error)}; "e1"/"e2" are one tie group "e".
TABLE = {
    "a": {"int8": (1100, 0.01), "int4-g128": (600, 0.2), "int2-g32-asym": (350, 0.9)},
    "b": {"int8": (4200, 0.02), "int4-g128": (2200, 0.1), "int2-g32-asym": (1300, 1.5)},
    "e1": {"int8": (2100, 0.01), "int4-g128": (1100, 0.05)},
    "e2": {"int8": (2100, 0.03), "int4-g128": (1100, 0.3)},
}
NUMEL = {"a": 1024, "b": 4096, "e1": 2048, "e2": 2048}


def _write(path: Path, *, with_bytes: bool) -> Path:
    lines = ["layer,format,error,numel,tie" + (",bytes" if with_bytes else "")]
    for layer, opts in TABLE.items():
        for fmt, (nbytes, err) in opts.items():
            tie = "e" if layer.startswith("e") else ""
            lines.append(
                f"{layer},{fmt},{err},{NUMEL[layer]},{tie}" + (f",{nbytes}" if with_bytes else "")
            )
    path.write_text("\n".join(lines) + "\n")
    return path


def _best_by_brute_force(cap: int, size) -> tuple[float, int]:
    """(error, bytes) of the best plan within ``cap``; the tie decided once."""
    groups = [
        {f: (size("a", f), e) for f, (_, e) in TABLE["a"].items()},
        {f: (size("b", f), e) for f, (_, e) in TABLE["b"].items()},
        {f: (size("e1", f), e + TABLE["e2"][f][1]) for f, (_, e) in TABLE["e1"].items()},
    ]
    combos = [
        (sum(o[1] for o in pick), sum(o[0] for o in pick))
        for pick in itertools.product(*(g.values() for g in groups))
    ]
    return min(c for c in combos if c[1] <= cap)


def test_solve_with_bytes_column(tmp_path: Path) -> None:
    table = _write(tmp_path / "t.csv", with_bytes=True)
    result = solve_table(table, budget="5000B", out_dir=tmp_path / "out")
    frontier = read_frontier(tmp_path / "out" / "frontier.json")
    assert frontier == result.file and frontier.budget == {"kind": "bytes", "value": 5000}
    best = read_plan(tmp_path / "out" / "plans" / f"{result.best_plan_id}.json")
    err, nbytes = _best_by_brute_force(5000, lambda layer, fmt: TABLE[layer][fmt][0])
    assert best.totals.total_bytes == nbytes <= 5000
    assert best.predicted_error == pytest.approx(err)
    assert best.model_ref == "table:t.csv" and best.layers[0].shape is None
    assert {lay.format for lay in best.layers if lay.tie == "e"} == {best.choice()["e"]}
    assert best.totals.bpw == pytest.approx(8 * nbytes / (1024 + 4096 + 2048))
    sizes = [p.total_bytes for p in frontier.points]
    assert sizes == sorted(sizes) and sizes[0] == 350 + 1300 + 1100
    assert sizes[-1] == 1100 + 4200 + 2100
    assert [u.plan_id for u in frontier.uniform] == ["u-int4-g128", "u-int8"]
    csv_rows = (tmp_path / "out" / "frontier.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + len(frontier.points) + len(frontier.uniform)


def test_solve_without_bytes_column_estimates_from_numel(tmp_path: Path) -> None:
    table = _write(tmp_path / "t.csv", with_bytes=False)
    result = solve_table(table, budget="0.3x", out_dir=tmp_path / "out")
    fp16 = 2 * (1024 + 4096 + 2048)
    cap = int(0.3 * fp16)
    err, nbytes = _best_by_brute_force(
        cap, lambda layer, fmt: estimated_bytes(parse_format(fmt), NUMEL[layer])
    )
    best = read_plan(tmp_path / "out" / "plans" / f"{result.best_plan_id}.json")
    assert best.totals.total_bytes == nbytes
    assert best.totals.ratio_vs_fp16 == pytest.approx(nbytes / fp16) and nbytes <= cap
    assert best.predicted_error == pytest.approx(err)
    a = next(lay for lay in best.layers if lay.name == "a")
    assert a.bytes == estimated_bytes(a.format, 1024)


def test_solve_without_budget_writes_the_spread(tmp_path: Path) -> None:
    table = _write(tmp_path / "t.csv", with_bytes=True)
    result = solve_table(table, budget=None, out_dir=tmp_path / "out", points=3)
    assert result.best_plan_id is None
    data = json.loads((tmp_path / "out" / "frontier.json").read_text())
    assert data["budget"] is None and len(data["points"]) == 3
    assert not (tmp_path / "out" / "plans" / "best.json").exists()  # no budget, no best
    assert len(result.frontier) > 3 and result.frontier.exact
    assert data["points"][0]["total_bytes"] == int(result.frontier.bytes[0])
    assert data["points"][-1]["total_bytes"] == int(result.frontier.bytes[-1])


def test_solve_infeasible_budget_names_smallest_size(tmp_path: Path) -> None:
    table = _write(tmp_path / "t.csv", with_bytes=True)
    with pytest.raises(InputError, match=r"smallest reachable size is 2750 bytes.*2\.750kB"):
        solve_table(table, budget="2kB", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_solve_needs_bytes_or_numel(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("layer,format,error\na,int8,0.1\n")
    with pytest.raises(InputError, match="bytes or a numel column"):
        solve_table(tmp_path / "t.csv", budget="4bpw", out_dir=tmp_path / "out")


@pytest.mark.parametrize("points", [2, 5, 9])
def test_solve_writes_exactly_the_points_asked_for(tmp_path: Path, points: int) -> None:
    """Evenly spaced byte targets collide on a sparse frontier; the count must not shrink."""
    table = _write(tmp_path / "t.csv", with_bytes=True)
    result = solve_table(table, budget="5000B", out_dir=tmp_path / "out", points=points)
    assert len(result.frontier) >= 9  # the premise: the frontier has enough points
    assert len(result.file.points) == points
    assert result.best_plan_id in [p.plan_id for p in result.file.points]
    written = sorted(path.stem for path in (tmp_path / "out" / "plans").glob("*.json"))
    assert written == sorted([*result.plan_ids, "best"])  # exactly the listed plans + best
    best = (tmp_path / "out" / "plans" / "best.json").read_text()
    assert best == (tmp_path / "out" / "plans" / f"{result.best_plan_id}.json").read_text()


def test_solve_says_when_the_budget_does_not_bind(tmp_path: Path) -> None:
    table = _write(tmp_path / "t.csv", with_bytes=True)
    loose = solve_table(table, budget="1MB", out_dir=tmp_path / "loose")
    assert loose.budget_note is not None and "everything fits" in loose.budget_note
    assert "1000000 bytes" in loose.budget_note and "7400 bytes" in loose.budget_note
    tight = solve_table(table, budget="5000B", out_dir=tmp_path / "tight")
    assert tight.budget_note is None


def test_solve_like_a_plan_takes_its_model_and_unplanned_bytes(tmp_path: Path) -> None:
    """Re-solving with a plan of the model: same totals and ids as that model's plans."""
    table = _write(tmp_path / "t.csv", with_bytes=True)
    first = solve_table(table, budget="5000B", out_dir=tmp_path / "first")
    ref = read_plan(tmp_path / "first" / "plans" / "best.json")
    job_like = make_plan(  # the same layers, as a model with 100 unplanned bytes would plan them
        model_ref="builtin:toy",
        model_sha256="ab" * 32,
        layers=rows_from_table(read_table(table)),
        choice=ref.choice(),
        budget=None,
        unplanned_bytes=100,
        fp16_bytes=ref.totals.fp16_bytes,
        predicted_error=None,
    )
    job_like.write(tmp_path / "job.json")
    again = solve_table(
        table, budget="5100B", out_dir=tmp_path / "again", like=tmp_path / "job.json"
    )
    best = read_plan(tmp_path / "again" / "plans" / "best.json")
    assert best.model_ref == "builtin:toy" and best.totals.unplanned_bytes == 100
    assert again.best_plan_id == first.best_plan_id  # same choice, same id
    assert best.totals.total_bytes == ref.totals.total_bytes + 100
