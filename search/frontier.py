"""The exact proxy frontier: every Pareto-optimal (planned bytes, predicted error) plan.

Under the additive model (:mod:`bitplan.search.problem`) the set of Pareto-optimal plans of a
multiple-choice knapsack can be built one group at a time: the Pareto set of the first ``t``
groups, plus each option of group ``t+1`` (a Minkowski sum of sorted chains), filtered back to
its Pareto set. Every Pareto-optimal plan of ``t+1`` groups restricts to a Pareto-optimal plan
of ``t`` groups (otherwise swapping in the dominating prefix would dominate it), so nothing is
lost, and one pass yields the frontier for *every* budget at once; :func:`best_under` then
answers a budget by binary search.

Conventions: bytes are integers; among plans with equal bytes the lower error wins; among
plans with equal error the fewer bytes win. Back-pointers per merge let any point's plan be
rebuilt without storing a plan per point; they are run-length encoded
(:mod:`bitplan.search._frontier_runs`), as a merge's points come in long runs of one option.
How one merge stays fast on large sets without losing a point is the subject of
:mod:`bitplan.search._frontier_merge` and :mod:`bitplan.search._frontier_bounds`.

The Pareto set can grow large (it is bounded only by the number of distinct byte totals). Past
``max_points`` it is thinned to one point per cell of an error grid, with a warning, and the
result says ``exact=False``; ``max_points=None`` never thins. References: Kellerer, Pferschy &
Pisinger, *Knapsack Problems* (2004), ch. 11 (multiple-choice knapsack) and the
"Nemhauser–Ullmann" Pareto-set algorithm.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bitplan.search._frontier_merge import merge_group
from bitplan.search._frontier_runs import Runs
from bitplan.search._frontier_scratch import Scratch
from bitplan.search.budgets import Budget
from bitplan.search.points import Point
from bitplan.search.problem import Group, Problem
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.progress import CancelFn, ProgressFn, check_cancel, report

__all__ = [
    "Frontier",
    "best_under",
    "budget_headroom",
    "exact_frontier",
    "planned_cap",
]

log = logging.getLogger(__name__)

# Thinning keeps at most half the cap, so a thinned set has room to grow for several merges
# before it must be thinned again (each thinning costs a pass over the set).
DEFAULT_MAX_POINTS = 200_000


@dataclass
class Frontier:
    """The Pareto set, sorted by ``bytes`` ascending (``error`` then strictly descends).

    ``bytes`` are planned bytes; total bytes add ``problem.unplanned_bytes``. ``exact`` is False
    when the set was thinned (see the module docstring).
    """

    problem: Problem
    bytes: np.ndarray  # int64 (n_points,)
    error: np.ndarray  # float64 (n_points,)
    exact: bool
    _order: list[int] = field(repr=False)  # group index merged at each step
    _runs: list[Runs] = field(repr=False)  # per step: back-pointers into the previous set

    def __len__(self) -> int:
        return len(self.bytes)

    def options(self, index: int) -> list[int]:
        """Option index per group (in ``problem.groups`` order) of point ``index``."""
        chosen = [0] * len(self.problem.groups)
        at = index
        for step in range(len(self._order) - 1, -1, -1):
            at, chosen[self._order[step]] = self._runs[step].locate(at)
        return chosen

    def point(self, index: int) -> Point:
        """Point ``index`` with its plan (``{group key: format}``); its ``number`` is ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"frontier has {len(self)} points, no point {index}")
        return Point(
            choice=self.problem.choice_of(self.options(index)),
            planned_bytes=int(self.bytes[index]),
            predicted_error=float(self.error[index]),
            source="exact",
            number=index,
        )

    def index_under(self, cap: int) -> int | None:
        """The index of the lowest-error point with planned bytes <= ``cap``; None when none
        fits (errors fall as bytes grow, so it is the largest point that fits)."""
        index = int(np.searchsorted(self.bytes, cap, side="right")) - 1
        return index if index >= 0 else None

    def spread(self, n: int, *, keep: Sequence[int] = ()) -> list[int]:
        """``min(n, len(self))`` point indices spread evenly in bytes, both ends included.

        Indices in ``keep`` are always among them (they count toward ``n``). Evenly spaced byte
        targets can land on one point twice where the frontier is sparse; every further pick is
        then the point farthest (in bytes) from those already picked, so exactly ``n`` distinct
        points come back whenever the frontier has that many.
        """
        count = min(n, len(self))
        if count < 1:
            return []
        picked = {int(i) for i in keep}
        if len(picked) > count:
            raise ValueError(f"asked to keep {len(picked)} points among {count}")
        targets = np.linspace(self.bytes[0], self.bytes[-1], num=count)
        near = np.searchsorted(self.bytes, targets, side="left").clip(0, len(self) - 1)
        for i in [0, len(self) - 1, *near.tolist()]:
            if len(picked) < count:
                picked.add(int(i))
        values = self.bytes.astype(np.float64)
        gap = np.min(np.abs(values[:, None] - values[sorted(picked)][None, :]), axis=1)
        while len(picked) < count:
            gap[sorted(picked)] = -1.0
            i = int(np.argmax(gap))  # (n_points,) distances to the nearest picked point
            picked.add(i)
            gap = np.minimum(gap, np.abs(values - values[i]))
        return sorted(picked)


def _prune(group: Group) -> np.ndarray:
    """Indices of the group's options no other option beats on both bytes and error (a plan
    using a beaten option is dominated by the same plan with the better one)."""
    order = np.lexsort((group.error, group.bytes))  # by bytes, then error
    err = group.error[order]
    best = np.minimum.accumulate(err)
    keep = np.r_[True, err[1:] < best[:-1]]
    return order[keep]


def _thin(err: np.ndarray, max_points: int) -> np.ndarray:
    """Mask keeping the cheapest point of each cell of an error grid with max_points/2 cells,
    and the lowest-error point, so both ends of the frontier stay exact."""
    span = float(err[0] - err[-1])
    cells = np.floor((err[0] - err) / span * (max_points // 2)).astype(np.int64)
    keep: np.ndarray = np.r_[True, cells[1:] != cells[:-1]]  # (n_points,) bool
    mask: np.ndarray = keep | (np.arange(len(err)) == len(err) - 1)
    return mask


def exact_frontier(
    problem: Problem,
    *,
    max_points: int | None = DEFAULT_MAX_POINTS,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> Frontier:
    """Every Pareto-optimal plan of ``problem`` (thinned past ``max_points``, see module doc;
    ``max_points=None`` keeps every point however many there are)."""
    if max_points is not None and max_points < 2:
        raise InputError(f"max_points must be at least 2, got {max_points}")
    kept = [_prune(g) for g in problem.groups]
    # Merging narrow groups first keeps the intermediate sets small for longer.
    order = sorted(
        range(len(problem.groups)), key=lambda i: int(np.ptp(problem.groups[i].bytes[kept[i]]))
    )
    cur_bytes = np.zeros(1, dtype=np.int64)
    cur_err = np.zeros(1, dtype=np.float64)
    runs: list[Runs] = []
    exact = True
    scratch = Scratch()
    for step, gi in enumerate(order):
        check_cancel(should_cancel)
        group, opts = problem.groups[gi], kept[gi]
        merged = merge_group(
            cur_bytes, cur_err, group.bytes[opts], group.error[opts], scratch=scratch
        )
        cur_bytes, cur_err, back = merged.bytes, merged.error, merged.runs.stored(opts)
        if max_points is not None and len(cur_bytes) > max_points:
            keep = np.flatnonzero(_thin(cur_err, max_points))
            if exact:
                log.warning(
                    "the Pareto set passed %d points at group %d of %d; thinning it to "
                    "an error grid, so the frontier is no longer exact",
                    max_points,
                    step + 1,
                    len(order),
                )
            exact = False
            back = back.select(keep, len(cur_bytes))
            cur_bytes, cur_err = cur_bytes[keep], cur_err[keep]
        runs.append(back)
        report(progress, "frontier", step + 1, len(order))
    return Frontier(
        problem=problem,
        bytes=cur_bytes.copy(),  # the last merge's output may be a view of scratch memory
        error=cur_err.copy(),
        exact=exact,
        _order=order,
        _runs=runs,
    )


def best_under(frontier: Frontier, cap: int) -> Point | None:
    """The lowest-error point with planned bytes <= ``cap``; None when none fits."""
    index = frontier.index_under(cap)
    return frontier.point(index) if index is not None else None


def _bound_text(problem: Problem) -> str:
    """What makes the smallest plan as large as it is, largest contributions first."""
    parts = []
    if problem.unplanned_bytes:
        parts.append(
            f"{problem.unplanned_bytes} bytes of unplanned parameters (biases, norms, "
            "excluded layers)"
        )
    smallest = sorted(((int(g.bytes.min()), g) for g in problem.groups), key=lambda pair: -pair[0])
    pinned = [f"{g.key}={g.pinned.name} ({b} bytes)" for b, g in smallest if g.pinned][:3]
    if pinned:
        parts.append("pinned " + ", ".join(pinned))
    ties = [
        f"{g.key} ({len(g.members)} layers, {b} bytes once)"
        for b, g in smallest
        if len(g.members) > 1 and g.tensors == 1
    ][:3]
    if ties:
        parts.append("tie groups " + ", ".join(ties))
    shares = [
        f"{g.key} ({len(g.members)} layers in one format, {b} bytes)"
        for b, g in smallest
        if g.tensors > 1
    ][:3]
    if shares:
        parts.append("share groups " + ", ".join(shares))
    largest = [
        f"{g.key} ({b} bytes in {g.formats[int(np.argmin(g.bytes))].name})" for b, g in smallest[:3]
    ]
    parts.append("largest minimum-size layers " + ", ".join(largest))
    return "; ".join(parts)


def planned_cap(problem: Problem, budget: Budget) -> int:
    """The planned-bytes cap of ``budget``, or an InputError naming the smallest reachable size
    (in bytes and in the budget's unit) and what bounds it when even that does not fit."""
    cap = budget.planned_cap(
        planned_numel=problem.planned_numel,
        unplanned_bytes=problem.unplanned_bytes,
        fp16_bytes=problem.fp16_bytes,
    )
    floor = sum(int(g.bytes.min()) for g in problem.groups)
    if cap < floor:
        own = budget.describe(
            planned_bytes=floor,
            planned_numel=problem.planned_numel,
            unplanned_bytes=problem.unplanned_bytes,
            fp16_bytes=problem.fp16_bytes,
        )
        raise InputError(
            f"budget {budget.text} is infeasible: the smallest reachable size is "
            f"{floor + problem.unplanned_bytes} bytes in total ({own}); bound by "
            f"{_bound_text(problem)}"
        )
    return cap


def budget_headroom(problem: Problem, budget: Budget, cap: int) -> str | None:
    """A note when ``budget`` (planned-bytes ``cap``) does not bind: even the largest plan, every
    group in its widest allowed format, fits. None when the budget constrains the plans."""
    ceiling = sum(int(g.bytes.max()) for g in problem.groups)
    if cap < ceiling:
        return None
    unplanned = problem.unplanned_bytes

    def size(planned: int) -> str:
        own = budget.describe(
            planned_bytes=planned,
            planned_numel=problem.planned_numel,
            unplanned_bytes=unplanned,
            fp16_bytes=problem.fp16_bytes,
        )
        return f"{planned + unplanned} bytes in total ({own})"

    return (
        f"budget {budget.text} allows {size(cap)}, but the largest plan (every layer in its "
        f"widest format) takes {size(ceiling)}: everything fits, so the budget does not "
        "constrain the plans"
    )
