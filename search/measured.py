"""Multi-objective search of per-group formats on the *measured* error, with Optuna.

The exact frontier (``bitplan.search.frontier``) trusts an additive proxy: the error of a plan is
the sum of its layers' sensitivities. Real errors interact, so this module searches plans on the
error that the caller measures on the calibration split, minimising ``(bytes, error)`` together.

How the search is set up, and why:

* **One categorical parameter per group** (a layer or a tie group), named after the group.
  Groups with one allowed format (pinned) are fixed and never suggested. Formats cross into
  Optuna as their names (its categorical choices, seeds and user attrs are JSON) and come back
  as the caller's :class:`~bitplan.sensitivity.format_spec.QuantFormat` objects: choices in and
  out of this module are parsed formats.
* **Size is exact, error is measured.** ``bytes = Σ group_bytes[group][format]`` is computed from
  the choice and stored as the trial's user attr ``"bytes"``; the objective returns
  ``(bytes, error)``, both minimised.
* **The budget is a constraint.** Each trial records ``sampled_bytes - cap_bytes`` with
  ``Trial.set_constraint`` (Optuna 5's replacement for the deprecated ``constraints_func``),
  so NSGA-II's constrained domination and constrained TPE steer sampling into the budget.
* **Infeasible samples are repaired, not wasted.** A sampled choice over the cap is repaired
  greedily: the group that currently takes the most bytes moves to its next smaller allowed
  format, repeatedly, until the choice fits (it always does, because the cap is checked against
  the smallest reachable size up front). The repaired choice is what gets evaluated and reported
  (user attr ``"repaired"`` holds the groups it changed); the trial itself keeps its positive
  constraint value, so the sampler still learns that the *sampled* parameters were infeasible.
  No forward pass is ever spent on a plan that breaks the budget.
* **Seeds first.** Seed choices (exact-frontier points near the budget, uniform plans) are
  enqueued in order, deduplicated, with user attr ``"source": "seed"``; they count toward
  ``trials``.
* **Guided by the proxy, when given one.** With ``proxy`` (the sensitivity table's error per
  group and format) only the head of the seed list runs first; then local moves around the
  measured Pareto plans nearest the cap, the rest of the seeds ranked by the proxy corrected on
  the measured trials, and sampler trials take turns (:mod:`bitplan.search.guided`), and the
  result reports the proxy-vs-measured gap (:class:`~bitplan.search.proxy_fit.ProxyGap`).
* **Identical choices are evaluated once** (NSGA-II repeats individuals): errors are cached by
  the choice, and the cache starts from the study's finished trials when a study is continued.
* **Reproducible:** the same ``seed`` and a deterministic ``evaluate`` give the same trials.
* **Interruptible:** Ctrl-C (``KeyboardInterrupt``) or
:class:`~bitplan.sensitivity.progress.Cancelled`
  raised inside ``evaluate``, ``should_cancel()`` turning true, or the timeout all end the search
  with every finished trial kept and ``interrupted=True``.

Shared studies: with ``storage`` (an RDB URL such as ``sqlite:///optuna.db`` or
``postgresql://…``, or a storage made by :func:`rdb_storage`) and ``study_name``, several
workers (or successive calls) continue one study: Optuna's own distributed mode, each process
asking and telling trials of one RDB study. Optuna's RDB storage keeps its own Alembic version
table, also named ``alembic_version``: the service must give Optuna its own database (or
PostgreSQL schema, or URL) rather than the app's, or the two migration histories collide.
Workers that share a study should pass different seeds (or they sample the same choices) and
the same ``trials`` (it sets NSGA-II's population size). On a shared storage:

* ``trials`` is the **study's total** of complete trials, all workers together: each worker
  stops when the study holds that many. A trial is *admitted* only while fewer than ``trials``
  live trials (complete, running or waiting) have a smaller trial number; otherwise it waits
  for those to end (a failed or pruned trial frees a place) and is pruned, unevaluated, once
  the study is complete. Trial numbers grow with creation, and a trial that completes was live
  from its creation on, so every complete trial saw all complete trials numbered below it as
  live: at most ``trials`` trials ever complete, whatever the timing (no overshoot).
* Every complete trial records the process that measured it (user attr ``"worker"``), and the
  cache of measured choices is refreshed from the study's complete trials, so a choice another
  worker measured is not measured again.
* The storage runs Optuna's heartbeat: a trial whose process died stops beating and is marked
  failed after :data:`OPTUNA_GRACE_S` by the next trial started in the study (and by workers
  waiting for a place), so its place is sampled again and never counted.
* The Pareto set is built from every complete trial of the study, whoever measured it.

References: Deb et al., "A fast and elitist multiobjective genetic algorithm: NSGA-II" (2002);
Ozaki et al., "Multiobjective tree-structured Parzen estimator" (2022); HAQ (Wang et al., 2019)
for searching per-layer bit widths on measured quality under a resource budget.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from bitplan.search.guided import GuideCallback, GuidedTrials, first_seed_count, fit_near_cap
from bitplan.search.local_moves import Neighbourhood
from bitplan.search.pareto import pareto_front
from bitplan.search.points import Choice, Point, choice_names
from bitplan.search.problem import Problem
from bitplan.search.proxy_fit import ProxyGap, ProxyTable, proxy_gap
from bitplan.search.spec import SAMPLERS
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.format_spec import QuantFormat
from bitplan.sensitivity.progress import CancelFn, Cancelled, ProgressFn, report

__all__ = [
    "SAMPLERS",
    "SearchResult",
    "measured_search",
    "pareto_front",
    "rdb_storage",
    "search_space",
]

logger = logging.getLogger(__name__)

_CAP_CONSTRAINT = "bytes_over_cap"
# NSGA-II improves on random sampling only from its second generation on: a quarter of the trial
# budget per generation gives at least four generations; 8 keeps crossover from inbreeding a tiny
# population, 50 is Optuna's own default for long runs.
_MIN_POPULATION, _MAX_POPULATION, _GENERATIONS = 8, 50, 4
# Optuna's RDB heartbeat: a running trial records a beat every HEARTBEAT_S; one silent for
# GRACE_S (its process died) is failed by the next trial any process starts in that study, so a
# shared study never counts a dead worker's RUNNING trial as work in flight. The grace spans
# several beats, so a busy database or a long garbage collection does not fail a live trial.
OPTUNA_HEARTBEAT_S = 10
OPTUNA_GRACE_S = 60
# How often a worker of a shared study waiting for a place looks at the study again (seconds):
# one small query, far below a trial's cost.
_ADMISSION_POLL_S = 0.2
_LIVE = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)


# Per group: its allowed formats; and per group and format: the group's planned bytes.
Options = Mapping[str, Sequence[QuantFormat]]
GroupBytes = Mapping[str, Mapping[QuantFormat, int]]


@dataclass
class SearchResult:
    """Every complete trial, the feasible Pareto set over ``(bytes, error)`` sorted by bytes,
    whether the search stopped early, and where the time went (``eval_s`` inside ``evaluate``).

    Each trial is a :class:`Point` with its ``planned_bytes``, its measured error as
    ``calibration["error"]``, its trial ``number`` and ``source`` ``seed``, ``local`` or
    ``sampler``. ``proxy_gap`` compares the proxy with the measured trials (None without one).
    """

    trials: list[Point]
    pareto: list[Point]
    interrupted: bool
    wall_s: float
    eval_s: float
    proxy_gap: ProxyGap | None = None


def search_space(problem: Problem) -> tuple[Options, GroupBytes]:
    """``options`` and ``group_bytes`` of :func:`measured_search` for ``problem``'s groups."""
    options = {g.key: g.formats for g in problem.groups}
    group_bytes = {
        g.key: dict(zip(g.formats, map(int, g.bytes), strict=True)) for g in problem.groups
    }
    return options, group_bytes


def measured_search(
    *,
    options: Options,
    group_bytes: GroupBytes,
    cap_bytes: int | None,
    evaluate: Callable[[dict[str, QuantFormat]], float],
    seeds: Sequence[Choice] = (),
    proxy: ProxyTable | None = None,
    trials: int,
    timeout: float | None = None,
    seed: int = 0,
    sampler: str = "nsga2",
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> SearchResult:
    """Search formats per group, minimising (planned bytes, measured error) under ``cap_bytes``.

    ``options`` maps each group to its allowed formats (one for a pinned group);
    ``group_bytes[group][format]`` is that group's planned bytes (a tie group counted once).
    ``evaluate(choice)`` applies the choice in place, measures the error on the calibration
    split and restores the model; it is called only for choices within the cap, at most once per
    distinct choice. ``trials`` counts trials run by this call, seeds included (on a shared
    ``storage``: the study's complete trials, all workers together); ``timeout`` is in seconds.
    ``proxy[group][format]`` is the additive proxy's error (the sensitivity table's); with it
    the search is guided near the cap. See the module docstring for the repair rule, seeding,
    guidance and shared studies.
    """
    started = time.perf_counter()
    _check_arguments(options, group_bytes, cap_bytes, trials, timeout, sampler, storage, study_name)
    _check_proxy(proxy, options)
    objective = _Objective(
        options=options, group_bytes=group_bytes, cap_bytes=cap_bytes, evaluate=evaluate
    )
    shared = storage is not None
    seed_params = _seed_params(seeds, options, objective.free)
    first = len(seed_params) if proxy is None else first_seed_count(len(seed_params), trials)

    with _quiet_optuna():
        study = optuna.create_study(
            directions=["minimize", "minimize"],
            sampler=_make_sampler(sampler, seed=seed, trials=trials),
            storage=rdb_storage(storage) if isinstance(storage, str) else storage,
            study_name=study_name,
            load_if_exists=shared,
        )
        if shared:
            _fail_stale(study)  # a dead worker's trial is no place taken
            objective.admission = _Admission(
                trials=trials,
                should_cancel=should_cancel,
                deadline=None if timeout is None else started + timeout,
                objective=objective,
            )
        for params in seed_params[:first]:
            study.enqueue_trial(params, user_attrs={"source": "seed"}, skip_if_exists=True)
        known = objective.points(study)
        objective.remember(known)
        tracker = _Tracker(
            trials=trials, progress=progress, should_cancel=should_cancel, shared=shared
        )
        callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [tracker]
        if proxy is not None:
            guided = GuidedTrials(
                neighbourhood=Neighbourhood(options=options, group_bytes=group_bytes, proxy=proxy),
                proxy=proxy,
                later=[objective.choice_of(params) for params in seed_params[first:]],
                cap_bytes=cap_bytes,
                known=known,
            )
            guide = GuideCallback(
                guided, point_of=objective.point_of, free=objective.free, first=first, trials=trials
            )
            # The tracker runs first: once a shared study is complete, nothing more is enqueued
            # (a guided trial nobody runs would stay WAITING in the study).
            callbacks.append(lambda s, t: None if tracker.study_complete else guide(s, t))
        if trials > 0 and not (should_cancel is not None and should_cancel()):
            try:
                study.optimize(
                    objective,
                    n_trials=None if shared else trials,  # shared: until the study is complete
                    timeout=timeout,
                    callbacks=callbacks,
                )
            except KeyboardInterrupt:  # Ctrl-C outside evaluate, inside Optuna's own loop
                logger.warning("search interrupted after %d of %d trials", tracker.done, trials)
        found = objective.points(study)

    gap = None if proxy is None else proxy_gap(found, proxy, fit_near_cap(found, proxy, cap_bytes))
    result = SearchResult(
        trials=found,
        pareto=pareto_front(found, cap_bytes=cap_bytes),
        interrupted=(len(found) if shared else tracker.done) < trials,
        wall_s=time.perf_counter() - started,
        eval_s=objective.eval_s,
        proxy_gap=gap,
    )
    logger.info(
        "measured search: %d trials (%d new), %d on the Pareto set, %.1fs (%.1fs evaluating)%s",
        len(found), tracker.done, len(result.pareto), result.wall_s, result.eval_s,
        "" if gap is None else f"; proxy gap {gap.as_dict()}",
    )  # fmt: skip
    return result


class _Objective:
    """One trial: suggest the free groups, repair over the cap, evaluate unless cached."""

    def __init__(
        self,
        *,
        options: Options,
        group_bytes: GroupBytes,
        cap_bytes: int | None,
        evaluate: Callable[[dict[str, QuantFormat]], float],
    ) -> None:
        self.options, self.group_bytes, self.cap_bytes = options, group_bytes, cap_bytes
        self.evaluate = evaluate
        self.groups = list(options)
        self.free = [g for g in self.groups if len(options[g]) > 1]
        self.fixed = {g: options[g][0] for g in self.groups if len(options[g]) == 1}
        # The Optuna boundary: a free group's categorical choices are its formats' names.
        self.names = {g: [f.name for f in options[g]] for g in self.free}
        self.by_name = {g: {f.name: f for f in options[g]} for g in self.groups}
        self.cache: dict[tuple[QuantFormat, ...], float] = {}
        self.eval_s = 0.0
        self.admission: _Admission | None = None  # set on a shared study
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def remember(self, known: Sequence[Point]) -> None:
        """Seed the cache with choices already measured (a continued or shared study)."""
        self.cache.update((_key(p.choice, self.groups), p.error) for p in known)

    def __call__(self, trial: Trial) -> tuple[float, float]:
        if self.admission is not None:
            if not self.admission.admit(trial):
                trial.study.stop()
                raise optuna.TrialPruned("the shared study is complete")
            trial.set_user_attr("worker", self.worker)
        choice = dict(self.fixed)
        for group in self.free:
            name = trial.suggest_categorical(group, self.names[group])
            choice[group] = self.by_name[group][name]
        size = _size(choice, self.group_bytes)
        if self.cap_bytes is not None:
            trial.set_constraint(_CAP_CONSTRAINT, size - self.cap_bytes)
            if size > self.cap_bytes:
                repaired = _repair(choice, self.options, self.group_bytes, self.cap_bytes)
                changed = {g: f for g, f in repaired.items() if f != choice[g]}
                trial.set_user_attr("repaired", choice_names(changed))
                choice, size = repaired, _size(repaired, self.group_bytes)
        trial.set_user_attr("bytes", size)
        key = _key(choice, self.groups)
        if key not in self.cache:
            self.cache[key] = self._measure(trial, choice)
        return float(size), self.cache[key]

    def points(self, study: optuna.Study) -> list[Point]:
        """Every complete trial of the study as a point, in trial order."""
        return [
            self.point_of(t)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        ]

    def choice_of(self, names: Mapping[str, str]) -> dict[str, QuantFormat]:
        """The choice of Optuna params (free groups' format names), pinned groups added."""
        names = {**choice_names(self.fixed), **names}
        return {g: self.by_name[g][names[g]] for g in self.groups}

    def point_of(self, t: FrozenTrial) -> Point:
        """A complete trial as a point: the choice it evaluated (repaired, if it was)."""
        return Point(
            choice=self.choice_of({**t.params, **t.user_attrs.get("repaired", {})}),
            planned_bytes=int(t.user_attrs["bytes"]),
            calibration={"error": float(t.values[1])},
            source=t.user_attrs.get("source", "sampler"),
            number=t.number,
        )

    def _measure(self, trial: Trial, choice: dict[str, QuantFormat]) -> float:
        started = time.perf_counter()
        try:
            error = float(self.evaluate(dict(choice)))
        except (KeyboardInterrupt, Cancelled) as stop:
            # End the search cleanly: the unfinished trial is marked pruned (not a failure with
            # a traceback) and every finished trial is kept.
            logger.warning("search interrupted in trial %d: %r", trial.number, stop)
            trial.study.stop()
            raise optuna.TrialPruned() from stop
        finally:
            self.eval_s += time.perf_counter() - started
        if math.isnan(error):
            logger.warning("evaluate returned NaN in trial %d; ranked worst", trial.number)
            return math.inf
        return error


class _Admission:
    """Whether a trial of a shared study may run: fewer than ``trials`` live trials before it
    (see the module docstring); waits for a place while earlier trials are running."""

    def __init__(
        self,
        *,
        trials: int,
        should_cancel: CancelFn | None,
        deadline: float | None,
        objective: _Objective,
    ) -> None:
        self.trials, self.should_cancel, self.deadline = trials, should_cancel, deadline
        self.objective = objective

    def admit(self, trial: Trial) -> bool:
        """True when ``trial`` has a place; False when the study is complete, the search was
        cancelled or its time is up (the caller then prunes it and stops)."""
        waited = False
        while True:
            live = trial.study.get_trials(deepcopy=False, states=_LIVE)
            complete = [t for t in live if t.state == TrialState.COMPLETE]
            self.objective.remember([self.objective.point_of(t) for t in complete])
            if sum(t.number < trial.number for t in live) < self.trials:
                return True
            stopped = self.should_cancel is not None and self.should_cancel()
            late = self.deadline is not None and time.perf_counter() >= self.deadline
            if len(complete) >= self.trials or stopped or late:
                return False
            if not waited:
                logger.debug("trial %d waits for a place in the shared study", trial.number)
                waited = True
            time.sleep(_ADMISSION_POLL_S)
            _fail_stale(trial.study)


class _Tracker:
    """Optuna callback: counts complete trials, reports progress, stops when cancelled (and, on
    a shared study, when the study holds ``trials`` complete trials)."""

    def __init__(
        self,
        *,
        trials: int,
        progress: ProgressFn | None,
        should_cancel: CancelFn | None,
        shared: bool = False,
    ) -> None:
        self.trials, self.progress, self.should_cancel = trials, progress, should_cancel
        self.shared = shared
        self.done = 0  # complete trials of this call
        self.study_complete = False  # a shared study holds `trials` complete trials

    def __call__(self, study: optuna.Study, finished: FrozenTrial) -> None:
        total = self.done = self.done + (finished.state == TrialState.COMPLETE)
        if self.shared:
            total = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            if total >= self.trials:
                self.study_complete = True
                study.stop()
        if finished.state == TrialState.COMPLETE:
            report(self.progress, "search", min(total, self.trials), self.trials)
        if self.should_cancel is not None and self.should_cancel():
            study.stop()


def _check_arguments(
    options: Options,
    group_bytes: GroupBytes,
    cap_bytes: int | None,
    trials: int,
    timeout: float | None,
    sampler: str,
    storage: str | optuna.storages.BaseStorage | None,
    study_name: str | None,
) -> None:
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; accepted: {', '.join(SAMPLERS)}")
    if trials < 0:
        raise InputError(f"trials must be >= 0, got {trials}")
    if timeout is not None and timeout <= 0:
        raise InputError(f"timeout must be positive seconds or None, got {timeout}")
    if storage is not None and study_name is None:
        raise InputError("a shared storage needs a study_name, so that workers join one study")
    if not options:
        raise InputError("nothing to search: no quantizable groups")
    for group, allowed in options.items():
        if not allowed:
            raise InputError(f"group {group!r} has no allowed format; give at least one")
        missing = [f.name for f in allowed if f not in group_bytes.get(group, {})]
        if missing:
            raise InputError(f"group {group!r} has no byte count for {', '.join(missing)}")
    smallest = sum(min(group_bytes[g][f] for f in allowed) for g, allowed in options.items())
    if cap_bytes is not None and cap_bytes < smallest:
        raise InputError(
            f"budget of {cap_bytes} planned bytes is below the smallest reachable {smallest}"
        )


def _check_proxy(proxy: ProxyTable | None, options: Options) -> None:
    """Every allowed format of every group has a finite proxy error."""
    if proxy is None:
        return
    for group, allowed in options.items():
        known = proxy.get(group, {})
        missing = [f.name for f in allowed if not math.isfinite(known.get(f, math.nan))]
        if missing:
            raise InputError(
                f"the proxy gives group {group!r} no finite error for {', '.join(missing)}"
            )


def _seed_params(
    seeds: Sequence[Choice], options: Options, free: list[str]
) -> list[dict[str, str]]:
    """Seed choices as Optuna params (free groups only, format names), validated and
    deduplicated in order."""
    out: list[dict[str, str]] = []
    for index, choice in enumerate(seeds):
        for group, fmt in choice.items():
            if group not in options:
                raise InputError(f"seed {index} names unknown group {group!r}")
            if fmt not in options[group]:
                raise InputError(
                    f"seed {index} gives {group!r} format {fmt.name!r}; "
                    f"allowed: {', '.join(f.name for f in options[group])}"
                )
        missing = [g for g in free if g not in choice]
        if missing:
            raise InputError(f"seed {index} gives no format for {', '.join(missing[:3])}")
        params = {g: choice[g].name for g in free}
        if params not in out:
            out.append(params)
    return out


def _make_sampler(name: str, *, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    population = min(_MAX_POPULATION, max(_MIN_POPULATION, trials // _GENERATIONS))
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)


def _size(choice: Choice, group_bytes: GroupBytes) -> int:
    return sum(group_bytes[g][f] for g, f in choice.items())


def _key(choice: Choice, groups: list[str]) -> tuple[QuantFormat, ...]:
    return tuple(choice[g] for g in groups)


def _repair(
    choice: dict[str, QuantFormat], options: Options, group_bytes: GroupBytes, cap_bytes: int
) -> dict[str, QuantFormat]:
    """Move the currently largest group to its next smaller format until the choice fits.

    Ties go to the group listed first. Terminates within the cap because the caller checked
    that every group at its smallest format fits.
    """
    out = dict(choice)
    order = {g: i for i, g in enumerate(options)}
    total = _size(out, group_bytes)
    heap = [(-group_bytes[g][f], order[g], g) for g, f in out.items()]
    heapq.heapify(heap)
    while total > cap_bytes:
        neg_bytes, rank, group = heapq.heappop(heap)
        smaller = [f for f in options[group] if group_bytes[group][f] < -neg_bytes]
        if not smaller:
            continue
        fmt = max(smaller, key=lambda f: (group_bytes[group][f], -options[group].index(f)))
        total -= -neg_bytes - group_bytes[group][fmt]
        out[group] = fmt
        heapq.heappush(heap, (-group_bytes[group][fmt], rank, group))
    return out


def rdb_storage(
    url: str, *, heartbeat_s: float | None = None, grace_s: float | None = None
) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage on ``url`` with heartbeats, so stale trials are failed: a beat every
    ``heartbeat_s`` (default :data:`OPTUNA_HEARTBEAT_S`), failed after ``grace_s`` of silence
    (default :data:`OPTUNA_GRACE_S`)."""
    heartbeat = OPTUNA_HEARTBEAT_S if heartbeat_s is None else heartbeat_s
    grace = OPTUNA_GRACE_S if grace_s is None else grace_s
    if heartbeat <= 0 or grace <= 0:
        raise InputError(f"heartbeat ({heartbeat} s) and grace ({grace} s) must be positive")
    with warnings.catch_warnings():
        # Heartbeats have been "experimental" since Optuna 2.9; the service relies on them.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Optuna counts whole seconds.
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=max(1, round(heartbeat)), grace_period=max(1, round(grace))
        )


def _fail_stale(study: optuna.Study) -> None:
    """Fail the study's running trials whose heartbeat stopped (their process died)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Silence Optuna's per-trial INFO lines for the duration, then restore the verbosity."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)
