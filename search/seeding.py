"""Seeds of the measured search: the exact proxy frontier at many budgets just under the cap.

The user asked for one budget, so the frontier they get should be dense there. Seeding the
measured search with a few points under the cap and a spread over the whole range spent most
trials far from the budget: with 16 trials a real decoder's measured frontier had four points,
two of them the uniform extremes. Here the seeds are the exact frontier's best plans at
:data:`BAND_BUDGETS` budgets evenly spaced in ``[BAND, 1] × cap``, then a few budgets below the
band (so the frontier still says what a smaller plan costs), then the uniform plans that fit.

The list is ordered coarse to fine (the cap, the band's bottom, its middle, its quarters, ...),
so that any head of it covers the band evenly: the measured search runs only the head first and
ranks the rest by the proxy corrected on what it measured (:mod:`bitplan.search.guided`); the
uniform plans, last, run only as far as trials allow.
"""

from __future__ import annotations

from collections.abc import Sequence

from bitplan.search.frontier import Frontier
from bitplan.search.points import Choice
from bitplan.search.problem import Problem
from bitplan.sensitivity.format_spec import QuantFormat

__all__ = ["BAND", "BAND_BUDGETS", "BELOW", "band_fractions", "dense_seeds"]

# "Near the budget": within 15 % under the cap, the plans a user weighs against the one at the
# cap (a 4.5 bpw budget spans 3.8-4.5 bpw).
BAND = 0.85
# Budgets in the band: 16 seeds give a frontier point every 1 % of the cap where the exact
# frontier has them, more than a 40-trial search measures.
BAND_BUDGETS = 16
NEXT_TO_CAP = 2
# A few budgets below the band, as fractions of the cap.
BELOW = (0.7, 0.55, 0.4)


def band_fractions(n: int) -> list[float]:
    """``n`` fractions of the cap spread over ``[BAND, 1]``, coarse to fine: 1, BAND, then the
    midpoints of ever finer halvings (a van der Corput order), so every head is even."""
    positions = [1.0, 0.0][:n]
    level = 2
    while len(positions) < n:
        positions += [k / level for k in range(1, level, 2)][: n - len(positions)]
        level *= 2
    return [BAND + (1.0 - BAND) * t for t in positions]


def dense_seeds(
    problem: Problem, frontier: Frontier, cap: int, formats: Sequence[QuantFormat]
) -> list[Choice]:
    """Exact-frontier plans at budgets in the band under ``cap`` (coarse to fine), a few
    below it, then the uniform plans of ``formats`` that fit; each plan once."""
    picked: list[int] = []
    top = frontier.index_under(cap)
    runner_up = [] if top is None else list(range(top - 1, max(-1, top - 1 - NEXT_TO_CAP), -1))
    targets = [frontier.index_under(int(f * cap)) for f in band_fractions(BAND_BUDGETS)]
    targets = targets[:2] + runner_up + targets[2:]
    targets += [frontier.index_under(int(f * cap)) for f in BELOW]
    for index in targets:
        if index is not None and index not in picked:
            picked.append(index)
    seeds: list[Choice] = [frontier.point(i).choice for i in picked]
    for fmt in formats:
        choice = problem.uniform_choice(fmt)
        if choice is not None and problem.cost(choice)[0] <= cap and choice not in seeds:
            seeds.append(choice)
    return seeds
