"""``bitplan solve TABLE.csv``: the exact proxy frontier of a sensitivity table, no model needed.

A user who measured sensitivities elsewhere (or re-solves a table bitplan wrote) gets the
frontier, its plans and the best plan under a budget in milliseconds. Without a model there are
no unplanned parameters and no shapes: the fp16 reference size (for ``0.3x`` budgets) is the
planned weights at 2 bytes each, plan layers carry null ``kind``/``shape``, and the plan's model
is ``table:<file name>`` with the table file's SHA-256. Given ``like`` (any plan of the model,
e.g. a job's ``plans/best.json``), the plans take that plan's model, layers and unplanned bytes
instead, so re-solving a job's ``sensitivity.csv`` writes plans with the job's own totals and,
for the same choice, the job's own plan id.

The exact frontier may hold many thousands of points; ``frontier.json`` lists ``points`` of
them (exactly that many when the frontier has them, spread evenly in bytes, both ends and the
best plan under the budget included), each with its plan file, plus the uniform-format plans as
reference points; the best plan is also written as ``plans/best.json``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from bitplan.search.budgets import parse_budget
from bitplan.search.frontier import Frontier, budget_headroom, exact_frontier, planned_cap
from bitplan.search.outputs import publish
from bitplan.search.plans import FrontierFile, Plan, read_plan
from bitplan.search.problem import LayerRow, build_problem, rows_from_table
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.progress import ProgressFn
from bitplan.sensitivity.table import read_table

__all__ = ["DEFAULT_POINTS", "SolveResult", "solve_table"]

log = logging.getLogger(__name__)

# Enough points to draw a smooth size/error curve, few enough to read as a list.
DEFAULT_POINTS = 32


@dataclass(frozen=True)
class SolveResult:
    """What :func:`solve_table` wrote. ``file`` lists exactly the plan files written;
    ``best_plan_id`` is the budget's answer (also ``plans/best.json``; None without a budget);
    ``budget_note`` says so when the budget does not constrain the plans."""

    out_dir: Path
    frontier: Frontier
    file: FrontierFile
    best_plan_id: str | None
    budget_note: str | None

    @property
    def plan_ids(self) -> list[str]:
        """Every plan written under ``plans/``, points then uniform baselines."""
        return [p.plan_id for p in self.file.points + self.file.uniform]


def _layers_like(plan: Plan, rows: list[LayerRow]) -> list[LayerRow]:
    """The plan's layers (shapes, kinds, params) in the table's order; the table's layers must
    be the plan's."""
    by_name = {lay.name: lay for lay in plan.layers}
    if set(by_name) != {r.name for r in rows}:
        diff = sorted(set(by_name) ^ {r.name for r in rows})
        raise InputError(
            f"the reference plan and the table plan different layers ({', '.join(diff[:3])}); "
            "pass a plan of the model the table was measured on"
        )
    return [
        LayerRow(
            name=lay.name,
            param=lay.param,
            numel=lay.numel,
            tie=lay.tie,
            share=r.share or lay.share,  # the table's group column, else the plan's
            kind=lay.kind,
            shape=lay.shape,
            table_bytes=r.table_bytes,
        )
        for r in rows
        for lay in [by_name[r.name]]
    ]


def solve_table(
    table_path: Path | str,
    *,
    budget: str | None,
    out_dir: Path | str,
    points: int = DEFAULT_POINTS,
    like: Path | str | None = None,
    progress: ProgressFn | None = None,
) -> SolveResult:
    """Solve a user table and write ``frontier.json``, ``frontier.csv`` and ``plans/*.json``.

    ``like`` is a plan file of the model the table was measured on (see the module docstring).
    Raises :class:`InputError` for a bad table or budget, and for a budget below the smallest
    reachable size (the message names that size and what bounds it).
    """
    if points < 2:
        raise InputError(f"points must be at least 2 (both ends of the frontier), got {points}")
    table_path, out = Path(table_path), Path(out_dir)
    table = read_table(table_path)
    rows = rows_from_table(table)
    if like is not None:
        ref = read_plan(like)
        rows = _layers_like(ref, rows)
        model_ref, sha = ref.model_ref, ref.model_sha256
        unplanned, fp16 = ref.totals.unplanned_bytes, ref.totals.fp16_bytes
    else:
        model_ref = f"table:{table_path.name}"
        sha = hashlib.sha256(table_path.read_bytes()).hexdigest()
        numel_once = {r.tensor_key: r.numel for r in rows}  # a tied tensor counts once
        unplanned, fp16 = 0, 2 * sum(numel_once.values())  # fp16: 2 bytes a weight
    problem = build_problem(table, rows, unplanned_bytes=unplanned, fp16_bytes=fp16)
    parsed = parse_budget(budget) if budget is not None else None
    cap = planned_cap(problem, parsed) if parsed is not None else None
    note = budget_headroom(problem, parsed, cap) if parsed is not None and cap is not None else None
    if note is not None:
        log.warning("%s", note)
    frontier = exact_frontier(problem, progress=progress)
    best = frontier.index_under(cap) if cap is not None else None
    picks = frontier.spread(points, keep=[best] if best is not None else [])
    exact = [frontier.point(i) for i in picks]
    formats = sorted({f for g in problem.groups for f in g.formats}, key=lambda f: f.name)
    uniform = []
    for fmt in formats:
        choice = problem.uniform_choice(fmt)
        if choice is not None:
            uniform.append(problem.point(choice, source=f"uniform:{fmt.name}"))
    written = publish(
        out,
        model_ref=model_ref,
        model_sha256=sha,
        problem=problem,
        budget=parsed,
        points=exact,
        uniform=uniform,
        best=exact[picks.index(best)] if best is not None else None,
    )
    best_id = written.best_plan_id
    if best_id is not None and parsed is not None:
        entry = next(p for p in written.frontier.points if p.plan_id == best_id)
        log.info(
            "best plan under %s: %s (%d bytes, %.3f bpw, predicted error %.4g)",
            parsed.text,
            best_id,
            entry.total_bytes,
            entry.bpw,
            entry.predicted_error,
        )
    log.info(
        "exact frontier: %d points (exact=%s); wrote %d plans to %s",
        len(frontier),
        frontier.exact,
        len(written.plan_ids),
        out,
    )
    return SolveResult(
        out_dir=out,
        frontier=frontier,
        file=written.frontier,
        best_plan_id=best_id,
        budget_note=note,
    )
