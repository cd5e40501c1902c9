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
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import optuna
import pandas as pd
import torch
from torch import nn

from bitplan.search.applier import PlanApplier
from bitplan.search.blockwise_eval import StreamedPlans, check_blockwise_job, streamed_rounder
from bitplan.search.budgets import Budget, parse_budget
from bitplan.search.frontier import Frontier, budget_headroom, exact_frontier, planned_cap
from bitplan.search.measured import measured_search, search_space
from bitplan.search.outputs import best_measured, publish
from bitplan.search.plans import FrontierFile, FrontierPoint, metrics_scope
from bitplan.search.points import Choice, Point
from bitplan.search.problem import Problem, as_layer_rows, build_problem
from bitplan.search.proxy_fit import ProxyGap, proxy_table
from bitplan.search.seeding import dense_seeds
from bitplan.search.spec import JobSpec
from bitplan.search.stage_stats import StageRecorder, watch_forwards
from bitplan.sensitivity.analyzer import analyze, rounder_for, write_table
from bitplan.sensitivity.blockwise import check_blockwise_method
from bitplan.sensitivity.data import CalibData, load_calibration, split_calibration
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.format_spec import QuantFormat, candidate_formats
from bitplan.sensitivity.fusion import fuse_layers
from bitplan.sensitivity.half_products import float32_products
from bitplan.sensitivity.layers import QuantLayer, parameter_bytes
from bitplan.sensitivity.lazy_hf import load_skeleton
from bitplan.sensitivity.metrics import collect_reference, measure
from bitplan.sensitivity.models import LoadedModel, load_model
from bitplan.sensitivity.progress import (
    CancelFn,
    Cancelled,
    ProgressFn,
    check_cancel,
    report,
)
from bitplan.sensitivity.rounder import Rounder, needs_data

__all__ = [
    "JobResult",
    "ScoreFn",
    "SensitivityFn",
    "UserMetric",
    "analyze_spec",
    "load_inputs",
    "run_job",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobResult:
    """Where a finished job's artifacts are and what they hold.

    ``frontier`` is the frontier file as written: its ``points`` (smallest first) and
    ``uniform`` baselines name exactly the plan files under ``plans/`` (:attr:`plan_ids`);
    ``best_plan_id`` is the plan also copied to ``plans/best.json``. ``budget_note`` says so
    when the budget does not constrain the plans (everything fits), else it is None.
    ``proxy_gap`` says how far the sensitivity proxy was from the search's measurements.
    ``stages`` is what each stage cost, in the order they ran
    (:meth:`~bitplan.search.stage_stats.StageRecorder.stages`: seconds, peak RSS,
    forward-equivalents of the calibration split).
    """

    out_dir: Path
    frontier_path: Path
    frontier: FrontierFile
    best_plan_id: str | None
    interrupted: bool
    budget_note: str | None
    proxy_gap: ProxyGap | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def plan_ids(self) -> list[str]:
        """Every plan written under ``plans/``, points then uniform baselines."""
        return [p.plan_id for p in self.frontier.points + self.frontier.uniform]

    @property
    def points(self) -> list[FrontierPoint]:
        return self.frontier.points

    @property
    def uniform(self) -> list[FrontierPoint]:
        return self.frontier.uniform


def load_inputs(
    spec: JobSpec,
    *,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    blockwise: bool = False,
) -> tuple[LoadedModel, CalibData, CalibData]:
    """The model and the seeded (calibration, held-out) split of its data; with ``blockwise``
    the model is a skeleton whose weights stay on disk (:func:`load_skeleton`)."""
    report(progress, "load", 0, 2)
    loader = load_skeleton if blockwise else partial(load_model, progress=progress)
    model = loader(
        spec.model,
        task=spec.task,
        device=spec.device,
        exclude=spec.exclude,
        pins=spec.pin_names(),
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


class SensitivityFn(Protocol):
    """How a job computes its sensitivity table: :func:`analyze`'s call. The default is
    :func:`analyze` in this process; a service worker may pass one that splits the layers over
    other workers (app/sensitivity_shards.py) and returns the same table."""

    def __call__(
        self,
        model: LoadedModel,
        calib: CalibData,
        *,
        method: str,
        formats: Sequence[QuantFormat],
        batch_size: int,
        seed: int,
        cache_dir: Path | None,
        progress: ProgressFn | None,
        should_cancel: CancelFn | None,
        rounder: Rounder | None,
    ) -> pd.DataFrame: ...


def _table(
    spec: JobSpec,
    model: LoadedModel,
    calib: CalibData,
    *,
    layers: list[QuantLayer],
    out_dir: Path,
    cache_dir: Path | None,
    progress: ProgressFn | None,
    should_cancel: CancelFn | None,
    rounder: Rounder | None = None,
    sensitivity: SensitivityFn = analyze,
) -> pd.DataFrame:
    table = sensitivity(
        model,
        calib,
        method=spec.method,
        formats=spec.options,
        batch_size=spec.batch_size,
        seed=spec.seed,
        cache_dir=cache_dir,
        progress=progress,
        should_cancel=should_cancel,
        rounder=rounder,
    )
    write_table(table, out_dir, layers)  # the layers as planned: share groups recorded
    return table


def analyze_spec(
    spec: JobSpec,
    *,
    out_dir: Path,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    blockwise: bool = False,
) -> pd.DataFrame:
    """``bitplan analyze``: the sensitivity table of ``spec``'s model on its calibration split.

    ``blockwise`` reads the model one transformer block at a time, for a model that does not
    fit in memory (:mod:`bitplan.sensitivity.blockwise`; method ``layer`` only)."""
    if blockwise:
        check_blockwise_method(spec.method)  # before anything is loaded
    model, calib, _ = load_inputs(spec, cache_dir=cache_dir, progress=progress, blockwise=blockwise)
    watch_forwards(progress, model.module, samples_per_pass=len(calib))
    return _table(
        spec,
        model,
        calib,
        layers=model.layers,
        out_dir=out_dir,
        cache_dir=cache_dir,
        progress=progress,
        should_cancel=should_cancel,
    )


def _check_budget(
    layers: list[QuantLayer],
    spec: JobSpec,
    budget: Budget,
    *,
    unplanned_bytes: int,
    fp16_bytes: int,
) -> None:
    """Fail before any measurement when even the smallest formats miss the budget."""
    rows = []
    planned = as_layer_rows(layers)
    pins = {lay.group: lay.pinned for lay in planned if lay.pinned is not None}
    for lay in planned:
        if lay.group in pins:  # a pin on one member pins its group
            formats = [pins[lay.group]]
        else:  # a model's layers have shapes; the formats its rows can be stored in
            formats = candidate_formats(spec.formats, lay.shape[1] if lay.shape else 0)
        rows += [
            {"layer": lay.name, "format": f.name, "error": 0.0, "bytes": lay.bytes_for(f)}
            for f in formats
        ]
    planned_cap(
        build_problem(
            pd.DataFrame(rows), planned, unplanned_bytes=unplanned_bytes, fp16_bytes=fp16_bytes
        ),
        budget,
    )


def _seeds(
    problem: Problem, frontier: Frontier, cap: int, formats: list[QuantFormat]
) -> list[Choice]:
    """Exact-frontier points at many budgets just under the cap, coarse to fine, a few below,
    then uniform plans (:func:`~bitplan.search.seeding.dense_seeds`)."""
    return dense_seeds(problem, frontier, cap, formats)


# A caller's score of a model: the module as it is at the call, some layers quantized in place.
ScoreFn = Callable[[nn.Module], float]


@dataclass(frozen=True)
class UserMetric:
    """The caller's own quality score (their data, their task), measured instead of DESIGN §7's.

    ``calibration`` scores plans during the search (the measured objective); ``holdout`` re-scores
    the frontier and the uniform baselines for the held-out figures, so it should see data the
    search never saw (it may be the same function, then those figures are the search's own).

    The axis the search minimises stays an error relative to the full-precision model, exactly 0
    for the unchanged model like the built-in errors: ``reference - score`` when
    ``higher_is_better``, else ``score - reference``. It is not clipped at 0: a plan that happens
    to score better than full precision gets a negative error and ranks first, which is what the
    user's own score says. A plan's metrics then hold ``error``, ``metric`` (its score) and
    ``metric_ref`` (the full-precision score); the built-in metrics are not measured at all, so
    each plan costs one call of the user's score and no forward pass of bitplan's.
    """

    calibration: ScoreFn
    holdout: ScoreFn
    higher_is_better: bool = True


class _UserScore:
    """One split's :class:`UserMetric` scoring: checks every value, errors against the reference."""

    def __init__(self, module: nn.Module, metric: UserMetric, *, holdout: bool) -> None:
        self.module = module
        self.score = metric.holdout if holdout else metric.calibration
        self.label = "held-out metric" if holdout else "metric"
        self.sign = 1.0 if metric.higher_is_better else -1.0
        self.reference = self._call("the full-precision model")

    def _call(self, what: str) -> float:
        try:
            # scoring needs no graph (a metric that does can enable_grad()); half products as
            # every other forward pass of the job computes them
            with torch.no_grad(), float32_products(self.module):
                value = self.score(self.module)
        except (Cancelled, InputError):
            raise
        except Exception as exc:
            raise InputError(
                f"the {self.label} raised {type(exc).__name__}: {exc} (scoring {what}); "
                "it must score any variant of the model it is given"
            ) from exc
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            hint = " (use .item() for a tensor)" if isinstance(value, torch.Tensor) else ""
            raise InputError(
                f"the {self.label} returned {type(value).__name__} {value!r:.60} for {what}; "
                f"it must return a float{hint}"
            )
        if not math.isfinite(value):
            raise InputError(
                f"the {self.label} returned {value} for {what}; it must return a finite number "
                "for every model (saturate it, e.g. min(perplexity, 1e6))"
            )
        return float(value)

    def __call__(self) -> dict[str, float]:
        value = self._call("a quantized model")
        return {
            "error": self.sign * (self.reference - value),
            "metric": value,
            "metric_ref": self.reference,
        }


class _Evaluator:
    """Applies a choice in place and measures it on one split, remembering every result.

    Without ``metric`` the built-in metrics are measured against a full-precision reference on
    ``data``; with one, its score of this split (``holdout`` or not) replaces them and ``data``
    goes unused.
    """

    def __init__(
        self,
        model: LoadedModel,
        applier: PlanApplier | StreamedPlans,
        data: CalibData,
        *,
        batch_size: int,
        metric: UserMetric | None = None,
        holdout: bool = False,
    ) -> None:
        self.applier = applier
        self.metrics: dict[frozenset[tuple[str, QuantFormat]], dict[str, float]] = {}
        applier.restore()  # both references are taken on the full-precision model
        self._measure: Callable[[], dict[str, float]]
        if metric is not None:
            self._measure = _UserScore(model.module, metric, holdout=holdout)
        else:
            # A skeleton's outputs are streamed block by block (None: the model runs whole).
            def outputs() -> Iterator[torch.Tensor] | None:
                if isinstance(applier, StreamedPlans):
                    return applier.outputs(data, batch_size)
                return None

            reference = collect_reference(
                model, data, batch_size=batch_size, given_outputs=outputs()
            )
            self._measure = lambda: measure(
                model, data, reference, batch_size=batch_size, given_outputs=outputs()
            )

    def __call__(self, choice: Choice) -> float:
        return self.measure(choice)["error"]

    def measure(self, choice: Choice) -> dict[str, float]:
        key = frozenset(choice.items())
        if key not in self.metrics:
            self.applier.apply(choice)
            self.metrics[key] = self._measure()
        return self.metrics[key]


def run_job(
    spec: JobSpec,
    *,
    out_dir: Path,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    optuna_storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    metric: UserMetric | None = None,
    sensitivity: SensitivityFn | None = None,
    blockwise: bool = False,
) -> JobResult:
    """Run a whole job and write its artifacts into ``out_dir``.

    Raises :class:`~bitplan.sensitivity.errors.InputError` for bad input (an infeasible budget among
    them, before anything is measured) and :class:`~bitplan.sensitivity.progress.Cancelled` when
    ``should_cancel`` says stop. A Ctrl-C or timeout during the search keeps every finished
    trial: the frontier found so far is validated and written. ``metric`` replaces the built-in
    metrics by the caller's own score (:class:`UserMetric`). The result's ``stages`` say what
    each stage cost (:mod:`bitplan.search.stage_stats`). ``sensitivity`` computes the table
    (:class:`SensitivityFn`; default :func:`analyze` here). ``blockwise`` runs a decoder LM
    larger than memory one transformer block at a time: ``layer`` sensitivity, and every plan
    measured end-to-end by a pass streamed from disk (:mod:`bitplan.search.blockwise_eval`).
    """
    with StageRecorder(progress) as recorder:
        result = _run_job(
            spec,
            out_dir=out_dir,
            cache_dir=cache_dir,
            progress=recorder,
            should_cancel=should_cancel,
            optuna_storage=optuna_storage,
            study_name=study_name,
            metric=metric,
            sensitivity=sensitivity or analyze,
            blockwise=blockwise,
        )
    return replace(result, stages=recorder.stages())


def _run_job(
    spec: JobSpec,
    *,
    out_dir: Path,
    cache_dir: Path | None,
    progress: ProgressFn,
    should_cancel: CancelFn | None,
    optuna_storage: str | optuna.storages.BaseStorage | None,
    study_name: str | None,
    metric: UserMetric | None,
    sensitivity: SensitivityFn,
    blockwise: bool,
) -> JobResult:
    if blockwise:
        check_blockwise_job(spec.method, user_metric=metric is not None)
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = parse_budget(spec.budget)
    model, calib, holdout = load_inputs(
        spec, cache_dir=cache_dir, progress=progress, blockwise=blockwise
    )
    watch_forwards(progress, model.module, samples_per_pass=len(calib))
    # Share groups join after loading: the sensitivity table (and its cache) stays per layer,
    # while the problem, the search, the uniform baselines and every plan decide per group.
    layers = fuse_layers(model.layers, spec.fuse)
    unplanned, fp16 = parameter_bytes(model.module, layers)
    _check_budget(layers, spec, budget, unplanned_bytes=unplanned, fp16_bytes=fp16)
    # Data-aware roundings are computed from the calibration split's input statistics, kept
    # beside the plans: the search measures those integers and `bitplan apply` ships them.
    rounder = (
        (streamed_rounder if blockwise else rounder_for)(
            model, calib, batch_size=spec.batch_size, workdir=out_dir, should_cancel=should_cancel
        )
        if needs_data(spec.options)
        else None
    )
    table = _table(
        spec,
        model,
        calib,
        layers=layers,
        out_dir=out_dir,
        cache_dir=cache_dir,
        progress=progress,
        should_cancel=should_cancel,
        rounder=rounder,
        sensitivity=sensitivity,
    )

    problem = build_problem(table, layers, unplanned_bytes=unplanned, fp16_bytes=fp16)
    cap = planned_cap(problem, budget)
    note = budget_headroom(problem, budget, cap)
    if note is not None:
        logger.warning("%s", note)
    frontier = exact_frontier(problem, progress=progress, should_cancel=should_cancel)
    logger.info("exact proxy frontier: %d points (exact=%s)", len(frontier), frontier.exact)

    applier = (
        StreamedPlans(model, layers, rounder=rounder, should_cancel=should_cancel)
        if blockwise
        else PlanApplier(model.module, layers, workdir=out_dir, rounder=rounder)
    )
    with applier:
        report(progress, "reference", 0, 2)
        on_calib = _Evaluator(model, applier, calib, batch_size=spec.batch_size, metric=metric)
        report(progress, "reference", 1, 2)
        if metric is not None and metric.holdout is metric.calibration:
            on_holdout = on_calib  # one score for both: re-scoring would only repeat it
        else:
            on_holdout = _Evaluator(
                model, applier, holdout, batch_size=spec.batch_size, metric=metric, holdout=True
            )
        report(progress, "reference", 2, 2)
        report(progress, "search", 0, spec.trials)  # the first trial is the search's, not here
        options, group_bytes = search_space(problem)
        result = measured_search(
            options=options,
            group_bytes=group_bytes,
            cap_bytes=cap,
            evaluate=on_calib,
            seeds=_seeds(problem, frontier, cap, spec.options),  # uniform gptq too
            proxy=proxy_table(problem),
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
        report(progress, "validate", 0, len(result.pareto))
        points = _validate(problem, result.pareto, on_calib, on_holdout, progress, should_cancel)
        uniform = _uniform_points(problem, spec.formats, on_calib, on_holdout, should_cancel)

    written = publish(
        out_dir,
        model_ref=spec.model_name or model.ref,
        model_sha256=model.sha256,
        problem=problem,
        budget=budget,
        points=points,
        uniform=uniform,
        best=best_measured(points),
        scope=metrics_scope(streamed=blockwise),
    )
    return JobResult(
        out_dir=out_dir,
        frontier_path=written.frontier_path,
        frontier=written.frontier,
        best_plan_id=written.best_plan_id,
        interrupted=result.interrupted,
        budget_note=note,
        proxy_gap=result.proxy_gap,
    )


def _measured(point: Point, on_calib: _Evaluator, on_holdout: _Evaluator) -> Point:
    """``point`` with its metrics on both splits."""
    return replace(
        point, calibration=on_calib.measure(point.choice), holdout=on_holdout.measure(point.choice)
    )


def _validate(
    problem: Problem,
    pareto: list[Point],
    on_calib: _Evaluator,
    on_holdout: _Evaluator,
    progress: ProgressFn | None,
    should_cancel: CancelFn | None,
) -> list[Point]:
    """Every measured Pareto point, predicted by the proxy and re-measured on the held-out
    split."""
    points = []
    for done, found in enumerate(pareto):
        check_cancel(should_cancel)
        point = problem.point(found.choice, source="search", number=found.number)
        points.append(_measured(point, on_calib, on_holdout))
        report(progress, "validate", done + 1, len(pareto))
    return points


def _uniform_points(
    problem: Problem,
    formats: list[QuantFormat],
    on_calib: _Evaluator,
    on_holdout: _Evaluator,
    should_cancel: CancelFn | None,
) -> list[Point]:
    """One format everywhere (pins kept), measured the same way: the baselines to beat."""
    points = []
    for fmt in formats:
        check_cancel(should_cancel)
        choice = problem.uniform_choice(fmt)
        if choice is not None:
            point = problem.point(choice, source=f"uniform:{fmt.name}")
            points.append(_measured(point, on_calib, on_holdout))
    return points
