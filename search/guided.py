"""The trials after the first seeds: local moves, later seeds and the sampler, interleaved.

A user asks for one budget; a frontier with a handful of points far apart, two of them the
uniform extremes, answers it poorly. With a proxy (the sensitivity table) the measured search
spends its trials where the user asked:

1. **First seeds**, enqueued before anything is measured: the head of the caller's seed list
   (exact-frontier points at many budgets near the cap, coarse to fine, see
   :mod:`bitplan.search.seeding`), :func:`first_seed_count` of them.
2. Then, trial by trial, a cycle of three slots (``_CYCLE``):

   * a **local move** (:mod:`bitplan.search.local_moves`): a one-up-one-down neighbour of one of
     the measured Pareto plans nearest the cap (taken in turn), the best by the corrected proxy's
     gain per byte that is not measured yet;
   * a **later seed**: the rest of the seed list, ranked by the corrected proxy: the seed
     predicted furthest below the measured frontier at its size comes first (uniform plans, far
     above it, come only as far as trials allow);
   * a **sampler** trial (NSGA-II or TPE), which explores beyond both and recombines them.

   An empty slot passes to the other guided kind, then to the sampler.
3. The proxy's correction (:mod:`bitplan.search.proxy_fit`) is refitted on the finished trials as
   they grow by a quarter, so a long run refits O(log trials) times.

Guided trials enter Optuna with ``study.enqueue_trial`` from a callback, right before the trial
that runs them: they stay in the study (their ``source`` user attr says ``local`` or ``seed``),
the sampler learns from them, and a run is as reproducible as the sampler: every decision
depends only on the finished trials, in order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from bitplan.search.local_moves import Neighbourhood, exchange_rate
from bitplan.search.pareto import pareto_front
from bitplan.search.points import Choice, Point
from bitplan.search.proxy_fit import MAX_FIT_TRIALS, ProxyFit, ProxyTable, fit_proxy
from bitplan.sensitivity.format_spec import QuantFormat

__all__ = ["GuideCallback", "GuidedTrials", "first_seed_count", "fit_near_cap"]

logger = logging.getLogger(__name__)

# First seeds take 40 % of the trials (at least 4): enough exact-frontier points to span the
# band under the cap and give the correction something to fit, while 60 % stay adaptive.
FIRST_SEED_SHARE, MIN_FIRST_SEEDS = 0.4, 4
# One sampler trial in four keeps Optuna exploring; the other three follow the measurements,
# local moves twice as often as later seeds (a move adapts to the last measurement, a seed only
# through the correction).
_CYCLE = ("local", "seed", "local", "sampler")
# Local moves start from the measured Pareto plans nearest the cap, this many in turn: one base
# alone climbs a single ridge, many spread the moves away from the budget.
_BASES = 3
_REFIT_GROWTH = 1.25  # refit when the measured trials grew by a quarter since the last fit

Key = frozenset[tuple[str, QuantFormat]]


def _key(choice: Choice) -> Key:
    return frozenset(choice.items())


def first_seed_count(seeds: int, trials: int) -> int:
    """How many of ``seeds`` seeds run before any guided trial, out of ``trials``."""
    return min(seeds, max(MIN_FIRST_SEEDS, math.ceil(FIRST_SEED_SHARE * trials)))


def fit_near_cap(points: Sequence[Point], proxy: ProxyTable, cap_bytes: int | None) -> ProxyFit:
    """The proxy's correction fitted on the measured points nearest the cap in bytes (at most
    :data:`~bitplan.search.proxy_fit.MAX_FIT_TRIALS`; the first ones without a cap), where the
    search makes its decisions."""
    measured = [p for p in points if math.isfinite(p.error)]
    if cap_bytes is not None and len(measured) > MAX_FIT_TRIALS:
        measured = sorted(measured, key=lambda p: abs(cap_bytes - p.planned_bytes))
    return fit_proxy([(p.choice, p.error) for p in measured[:MAX_FIT_TRIALS]], proxy)


class GuidedTrials:
    """What the search measures next, decided from the trials measured so far."""

    def __init__(
        self,
        *,
        neighbourhood: Neighbourhood,
        proxy: ProxyTable,
        later: Sequence[Choice],
        cap_bytes: int | None,
        known: Sequence[Point] = (),
    ) -> None:
        self.neighbourhood, self.proxy, self.cap_bytes = neighbourhood, proxy, cap_bytes
        self.later = list(later)
        self.measured: list[Point] = []
        self.front: list[Point] = []
        self.seen: set[Key] = set()
        self.fit = ProxyFit()
        self._fitted_on = 0
        self._turn = 0  # which base the next local move starts from
        for point in known:
            self.observe(point)

    def observe(self, point: Point) -> None:
        """Record a finished trial (its measured error may be non-finite: then it only counts
        as seen)."""
        self.seen.add(_key(point.choice))
        if math.isfinite(point.error):
            self.measured.append(point)
            self.front = pareto_front([*self.front, point], cap_bytes=self.cap_bytes)

    def pick(self, slot: int) -> tuple[dict[str, QuantFormat], str] | None:
        """The choice and source (``local`` or ``seed``) of guided slot ``slot``, or None when
        the slot is the sampler's (or nothing guided is left)."""
        kind = _CYCLE[slot % len(_CYCLE)]
        if kind == "sampler":
            return None
        self._refit()
        order = (self._local, self._seed) if kind == "local" else (self._seed, self._local)
        for find in order:
            choice = find()
            if choice is not None:
                self.seen.add(_key(choice))
                source = "local" if find == self._local else "seed"
                logger.debug("guided slot %d: %s %s", slot, source, choice)
                return dict(choice), source
        return None

    def _refit(self) -> None:
        if len(self.measured) >= max(2, math.ceil(self._fitted_on * _REFIT_GROWTH)):
            self.fit = fit_near_cap(self.measured, self.proxy, self.cap_bytes)
            self._fitted_on = len(self.measured)
            logger.debug("proxy correction on %d trials: %s", self._fitted_on, self.fit)

    def _local(self) -> Choice | None:
        """The best unmeasured move from the Pareto plans nearest the cap, bases in turn."""
        pairs = [(p.planned_bytes, p.error) for p in self.front]
        bases = list(range(len(self.front) - 1, max(-1, len(self.front) - 1 - _BASES), -1))
        for attempt in range(len(bases)):
            index = bases[(self._turn + attempt) % len(bases)]
            rate = exchange_rate(pairs, index)
            for move in self.neighbourhood.moves(
                self.front[index].choice, fit=self.fit, cap_bytes=self.cap_bytes, rate=rate
            ):
                if _key(move.choice) not in self.seen:
                    self._turn += 1
                    return move.choice
        return None

    def _seed(self) -> Choice | None:
        """The later seed predicted furthest below the measured frontier at its size; None
        when every one left is predicted above it (a local move is then the better bet)."""
        self.later = [c for c in self.later if _key(c) not in self.seen]
        if not self.later:
            return None
        promise = [self._promise(c) for c in self.later]
        best = max(range(len(self.later)), key=lambda i: (promise[i], -i))
        return self.later.pop(best) if promise[best] >= 0 else None

    def _promise(self, choice: Choice) -> float:
        """``log(frontier error at the choice's size / its corrected prediction)``: positive
        when it is predicted to beat every measured plan no larger; 0 where nothing measured is
        that small to compare with."""
        nbytes = sum(self.neighbourhood.group_bytes[g][f] for g, f in choice.items())
        below = [p for p in self.front if p.planned_bytes <= nbytes]
        guess = self.fit.predict(choice, self.proxy)
        if not below or below[-1].error <= 0 or guess <= 0:
            return 0.0
        return math.log(below[-1].error / guess)


class GuideCallback:
    """Optuna callback: after each finished trial, enqueue the next one when it is guided."""

    def __init__(
        self,
        guided: GuidedTrials,
        *,
        point_of: Callable[[FrozenTrial], Point],
        free: Sequence[str],
        first: int,
        trials: int,
    ) -> None:
        self.guided, self.point_of, self.free = guided, point_of, list(free)
        self.first, self.trials = first, trials
        self.finished = 0  # trials of this call that ended, in any state

    def __call__(self, study: optuna.Study, finished: FrozenTrial) -> None:
        self.finished += 1
        if finished.state == TrialState.COMPLETE:
            self.guided.observe(self.point_of(finished))
        if not self.first <= self.finished < self.trials:
            return
        picked = self.guided.pick(self.finished - self.first)
        if picked is not None:
            choice, source = picked
            params = {g: choice[g].name for g in self.free}
            study.enqueue_trial(params, user_attrs={"source": source})
