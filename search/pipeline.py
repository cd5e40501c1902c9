"""One whole planning job: load, analyze (cached), solve, search, validate, write artifacts.

Both the CLI (``bitplan search``) and the service worker call :func:`run_job`, so the two can
never drift apart. Stages report progress as ``load``, ``analyze``, ``solve``, ``search`` and
``validate``; the cancel check runs between layers, trials and validation points.

The search measures plans on the calibration split only; every point of the final frontier
(and every uniform-format reference point) is then re-measured on the held-out split, which is
the number the frontier reports (DESIGN §7).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bitplan.search.applier import PlanApplier
from bitplan.search.budgets import Budget, parse_budget
from bitplan.search.frontier import Frontier, best_under, exact_frontier, planned_cap
from bitplan.search.measured import Candidate, measured_search
from bitplan.search.outputs import PointRecord, write_job_outputs
from bitplan.search.problem import Problem, build_problem
from bitplan.search.spec import JobSpec
from bitplan.sensitivity.analyzer import analyze, write_table
from bitplan.sensitivity.data import CalibData, load_calibration, split_calibration
from bitplan.sensitivity.formats import parse_formats, tensor_bytes
from bitplan.sensitivity.layers import parameter_bytes
from bitplan.sensitivity.metrics import Reference, collect_reference, measure
from bitplan.sensitivity.models import LoadedModel, load_model
from bitplan.sensitivity.progress import CancelFn, ProgressFn, check_cancel, report

__all__ = ["JobResult", "analyze_spec", "load_inputs", "run_job"]

logger = logging.getLogger(__name__)

# Exact-frontier points handed to the measured search as seeds: the best few just under the
# budget (where the user's answer lies) plus a spread over the whole range (so the measured
# frontier covers every size, not just the budget).
_SEEDS_NEAR_BUDGET = 4
_SEEDS_SPREAD = 8


@dataclass
class JobResult:
    """Where a finished job's artifacts are and what they hold."""

    out_dir: Path
    frontier_path: Path
    plan_ids: list[str]
    interrupted: bool
    points: list[PointRecord] = field(default_factory=list)
    uniform: list[PointRecord] = field(default_factory=list)


def load_inputs(
    spec: JobSpec, *, cache_dir: Path | None = None, progress: ProgressFn | None = None
) -> tuple[LoadedModel, CalibData, CalibData]:
    """The model and the seeded (calibration, held-out) split of its data."""
    report(progress, "load", 0, 2)
    model = load_model(
        spec.model,
        task=spec.task,
        device=spec.device,
        exclude=spec.exclude,
        pins=spec.pins,
        cache_dir=cache_dir,
    )
    report(progress, "load", 1, 2)
    data = load_calibration(
        spec.calib, model, max_length=spec.max_length, max_samples=spec.max_samples
    )
    calib, holdout = split_calibration(data, holdout=spec.holdout, seed=spec.seed)
    report(progress, "load", 2, 2)
    logger.info(
        "%s: %d planned layers, %d calibration + %d held-out samples",
        spec.model,
        len(model.layers),
        len(calib),
        len(holdout),
    )
    return model, calib, holdout


def _table(
    spec: JobSpec,
    model: LoadedModel,
    calib: CalibData,
    *,
    out_dir: Path,
    cache_dir: Path | None,
    progress: ProgressFn | None,
    should_cancel: CancelFn | None,
) -> pd.DataFrame:
    table = analyze(
        model,
        calib,
        method=spec.method,
        formats=parse_formats(spec.formats),
        batch_size=spec.batch_size,
        seed=spec.seed,
        cache_dir=cache_dir,
        progress=progress,
        should_cancel=should_cancel,
    )
    write_table(table, out_dir, model.layers)
    return table


def analyze_spec(
    spec: JobSpec,
    *,
    out_dir: Path,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> pd.DataFrame:
    """``bitplan analyze``: the sensitivity table of ``spec``'s model on its calibration split."""
    model, calib, _ = load_inputs(spec, cache_dir=cache_dir, progress=progress)
    return _table(
        spec,
        model,
        calib,
        out_dir=out_dir,
        cache_dir=cache_dir,
        progress=progress,
        should_cancel=should_cancel,
    )


def _check_budget(
    model: LoadedModel, spec: JobSpec, budget: Budget, *, unplanned_bytes: int, fp16_bytes: int
) -> None:
    """Fail before any measurement when even the smallest formats miss the budget."""
    rows = []
    for lay in model.layers:
        names = [lay.pinned] if lay.pinned else spec.formats
        rows += [
            {"layer": lay.name, "format": n, "error": 0.0, "bytes": tensor_bytes(f, *lay.shape)}
            for n, f in zip(names, parse_formats(names), strict=True)
        ]
    planned_cap(
        build_problem(
            pd.DataFrame(rows), model.layers, unplanned_bytes=unplanned_bytes, fp16_bytes=fp16_bytes
        ),
        budget,
    )


def _seeds(
    problem: Problem, frontier: Frontier, cap: int, formats: list[str]
) -> list[dict[str, str]]:
    """Exact-frontier points near the budget and across the range, then uniform plans."""
    seeds: list[dict[str, str]] = []
    best = best_under(frontier, cap)
    if best is not None:
        seeds += [
            frontier.point(i).choice
            for i in range(best.index, max(-1, best.index - _SEEDS_NEAR_BUDGET), -1)
        ]
        seeds += [
            frontier.point(i).choice
            for i in frontier.spread(_SEEDS_SPREAD)
            if frontier.bytes[i] <= cap
        ]
    for fmt in formats:
        choice = problem.uniform_choice(fmt)
        if choice is not None and problem.cost(choice)[0] <= cap:
            seeds.append(choice)
    return seeds


class _Evaluator:
    """Applies a choice in place and measures it on one split, remembering every result."""

    def __init__(
        self, model: LoadedModel, applier: PlanApplier, data: CalibData, *, batch_size: int
    ) -> None:
        self.model, self.applier, self.data = model, applier, data
        self.batch_size = batch_size
        self.reference: Reference = collect_reference(model, data, batch_size=batch_size)
        self.metrics: dict[tuple[tuple[str, str], ...], dict[str, float]] = {}

    def __call__(self, choice: Mapping[str, str]) -> float:
        return self.measure(choice)["error"]

    def measure(self, choice: Mapping[str, str]) -> dict[str, float]:
        key = tuple(sorted(choice.items()))
        if key not in self.metrics:
            self.applier.apply(choice)
            self.metrics[key] = measure(
                self.model, self.data, self.reference, batch_size=self.batch_size
            )
        return self.metrics[key]


def run_job(
    spec: JobSpec,
    *,
    out_dir: Path,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    optuna_storage: str | None = None,
    study_name: str | None = None,
) -> JobResult:
    """Run a whole job and write its artifacts into ``out_dir``.

    Raises :class:`~bitplan.sensitivity.errors.InputError` for bad input (an infeasible budget among
    them, before anything is measured) and :class:`~bitplan.sensitivity.progress.Cancelled` when
    ``should_cancel`` says stop. A Ctrl-C or timeout during the search keeps every finished
    trial: the frontier found so far is validated and written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = parse_budget(spec.budget)
    model, calib, holdout = load_inputs(spec, cache_dir=cache_dir, progress=progress)
    unplanned, fp16 = parameter_bytes(model.module, model.layers)
    _check_budget(model, spec, budget, unplanned_bytes=unplanned, fp16_bytes=fp16)
    table = _table(
        spec,
        model,
        calib,
        out_dir=out_dir,
        cache_dir=cache_dir,
        progress=progress,
        should_cancel=should_cancel,
    )

    problem = build_problem(table, model.layers, unplanned_bytes=unplanned, fp16_bytes=fp16)
    cap = planned_cap(problem, budget)
    frontier = exact_frontier(problem, progress=progress, should_cancel=should_cancel)
    logger.info("exact proxy frontier: %d points (exact=%s)", len(frontier), frontier.exact)

    with PlanApplier(model.module, model.layers, workdir=out_dir) as applier:
        report(progress, "reference", 0, 2)
        on_calib = _Evaluator(model, applier, calib, batch_size=spec.batch_size)
        report(progress, "reference", 1, 2)
        on_holdout = _Evaluator(model, applier, holdout, batch_size=spec.batch_size)
        report(progress, "reference", 2, 2)
        result = measured_search(
            options={g.key: g.formats for g in problem.groups},
            group_bytes={
                g.key: dict(zip(g.formats, map(int, g.bytes), strict=True)) for g in problem.groups
            },
            cap_bytes=cap,
            evaluate=on_calib,
            seeds=_seeds(problem, frontier, cap, spec.formats),
            trials=spec.trials,
            timeout=spec.timeout,
            seed=spec.seed,
            sampler=spec.sampler,
            storage=optuna_storage,
            study_name=study_name,
            progress=progress,
            should_cancel=should_cancel,
        )
        check_cancel(should_cancel)
        points = _validate(result.pareto, problem, on_calib, on_holdout, progress, should_cancel)
        uniform = _uniform_points(problem, spec.formats, on_calib, on_holdout, should_cancel)

    paths = write_job_outputs(
        out_dir=out_dir, model=model, problem=problem, budget=budget, points=points, uniform=uniform
    )
    return JobResult(
        out_dir=out_dir,
        frontier_path=paths.frontier,
        plan_ids=paths.plan_ids,
        interrupted=result.interrupted,
        points=points,
        uniform=uniform,
    )


def _record(
    choice: Mapping[str, str],
    problem: Problem,
    source: str,
    on_calib: _Evaluator,
    on_holdout: _Evaluator,
) -> PointRecord:
    planned, predicted = problem.cost(choice)
    return PointRecord(
        choice=dict(choice),
        planned_bytes=planned,
        total_bytes=planned + problem.unplanned_bytes,
        bpw=8 * planned / problem.planned_numel,
        predicted_error=predicted,
        calibration=on_calib.measure(choice),
        holdout=on_holdout.measure(choice),
        source=source,
    )


def _validate(
    pareto: list[Candidate],
    problem: Problem,
    on_calib: _Evaluator,
    on_holdout: _Evaluator,
    progress: ProgressFn | None,
    should_cancel: CancelFn | None,
) -> list[PointRecord]:
    """Every measured Pareto point, re-measured on the held-out split."""
    points = []
    for done, cand in enumerate(pareto):
        check_cancel(should_cancel)
        points.append(_record(cand.choice, problem, "search", on_calib, on_holdout))
        report(progress, "validate", done + 1, len(pareto))
    return points


def _uniform_points(
    problem: Problem,
    formats: list[str],
    on_calib: _Evaluator,
    on_holdout: _Evaluator,
    should_cancel: CancelFn | None,
) -> list[PointRecord]:
    """One format everywhere (pins kept), measured the same way: the baselines to beat."""
    points = []
    for fmt in formats:
        check_cancel(should_cancel)
        choice = problem.uniform_choice(fmt)
        if choice is not None:
            points.append(_record(choice, problem, f"uniform:{fmt}", on_calib, on_holdout))
    return points
