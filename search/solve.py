"""``bitplan solve TABLE.csv``: the exact proxy frontier of a sensitivity table, no model needed.

A user who measured sensitivities elsewhere (or re-solves a table bitplan wrote) gets the
frontier, its plans and the best plan under a budget in milliseconds. Without a model there are
no unplanned parameters and no shapes: the fp16 reference size (for ``0.3x`` budgets) is the
planned weights at 2 bytes each, plan layers carry null ``kind``/``shape``, and the plan's model
is ``table:<file name>`` with the table file's SHA-256.

The exact frontier may hold many thousands of points; ``frontier.json`` lists an even spread of
them (``points`` at most, both ends included) plus the best plan under the budget, each with its
plan file, and the uniform-format plans as reference points.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from bitplan.search.budgets import parse_budget
from bitplan.search.frontier import Frontier, best_under, exact_frontier, planned_cap
from bitplan.search.plans import FrontierFile, Plan, make_plan, write_frontier
from bitplan.search.problem import build_problem, rows_from_table
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.progress import ProgressFn
from bitplan.sensitivity.table import read_table

__all__ = ["SolveResult", "solve_table"]

log = logging.getLogger(__name__)

# Enough points to draw a smooth size/error curve, few enough to read as a list.
DEFAULT_POINTS = 32


@dataclass
class SolveResult:
    """What :func:`solve_table` wrote; ``best_plan_id`` is the budget's answer (None without a
    budget)."""

    out_dir: Path
    frontier: Frontier
    file: FrontierFile
    best_plan_id: str | None


def solve_table(
    table_path: Path | str,
    *,
    budget: str | None,
    out_dir: Path | str,
    points: int = DEFAULT_POINTS,
    progress: ProgressFn | None = None,
) -> SolveResult:
    """Solve a user table and write ``frontier.json``, ``frontier.csv`` and ``plans/*.json``.

    Raises :class:`InputError` for a bad table or budget, and for a budget below the smallest
    reachable size (the message names that size and what bounds it).
    """
    if points < 2:
        raise InputError(f"points must be at least 2 (both ends of the frontier), got {points}")
    table_path, out = Path(table_path), Path(out_dir)
    table = read_table(table_path)
    rows = rows_from_table(table)
    numel_once = {r.group: r.numel for r in rows}  # a tie group's tensor counts once
    problem = build_problem(
        table, rows, unplanned_bytes=0, fp16_bytes=2 * sum(numel_once.values())
    )  # fp16: 2 bytes a weight
    parsed = parse_budget(budget) if budget is not None else None
    cap = planned_cap(problem, parsed) if parsed is not None else None
    frontier = exact_frontier(problem, progress=progress)
    best = best_under(frontier, cap) if cap is not None else None
    picks = set(frontier.spread(points)) | ({best.index} if best is not None else set())
    model_ref = f"table:{table_path.name}"
    sha = hashlib.sha256(table_path.read_bytes()).hexdigest()

    def plan_of(choice: dict[str, str], predicted: float) -> Plan:
        return make_plan(
            model_ref=model_ref,
            model_sha256=sha,
            layers=rows,
            choice=choice,
            budget=parsed,
            unplanned_bytes=0,
            fp16_bytes=problem.fp16_bytes,
            predicted_error=predicted,
        )

    exact = [
        (plan_of(frontier.point(i).choice, frontier.point(i).predicted_error), "exact")
        for i in sorted(picks)
    ]
    formats = sorted({f for g in problem.groups for f in g.formats})
    uniform = []
    for fmt in formats:
        choice = problem.uniform_choice(fmt)
        if choice is not None:
            uniform.append((plan_of(choice, problem.cost(choice)[1]), "uniform"))
    written = write_frontier(
        out, model_ref=model_ref, model_sha256=sha, budget=parsed, points=exact, uniform=uniform
    )
    best_id = None
    if best is not None and parsed is not None:
        best_id = next(p.plan_id for p in written.points if p.total_bytes == best.total_bytes)
        log.info(
            "best plan under %s: %s (%d bytes, %.3f bpw, predicted error %.4g)",
            parsed.text,
            best_id,
            best.total_bytes,
            best.bpw,
            best.predicted_error,
        )
    log.info(
        "exact frontier: %d points (exact=%s); wrote %d plans to %s",
        len(frontier),
        frontier.exact,
        len(written.points) + len(written.uniform),
        out,
    )
    return SolveResult(out_dir=out, frontier=frontier, file=written, best_plan_id=best_id)
