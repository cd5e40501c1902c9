"""One-up-one-down neighbours of a measured plan, ranked by the corrected proxy.

Near the budget the measured frontier is made denser by small steps from its best plans: one
group takes its next larger format and another its next smaller one, so the plan stays about
the same size and under the cap while bits move to where the measurements say they pay. This is
the exchange neighbourhood of the multiple-choice knapsack (Kellerer, Pferschy & Pisinger,
*Knapsack Problems*, 2004, ch. 11) and the swap step of greedy bit allocators (HAQ, AIMET's
greedy promotion) run on measured plans instead of on the proxy's.

A move changes bytes by ``Δ`` and the corrected proxy's error by ``-gain``
(:class:`~bitplan.search.proxy_fit.ProxyFit`). Moves are ranked by their gain per byte measured
against the frontier's own exchange rate ``λ`` at the base plan (the slope of the measured
frontier around it): ``value = gain - λ · Δ``. A move with positive value lands below the
frontier's tangent at the base, where a new frontier point is expected: buying error at a better
price than the frontier pays (``Δ > 0``), or giving bytes back for less error than it saves
(``Δ < 0``); one that saves bytes *and* error has a positive value whatever ``λ``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bitplan.search.points import Choice
from bitplan.search.proxy_fit import ProxyFit, ProxyTable
from bitplan.sensitivity.format_spec import QuantFormat

__all__ = ["Move", "Neighbourhood", "exchange_rate"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Move:
    """A neighbour of a plan: ``up`` takes its next larger format, ``down`` its next smaller;
    ``nbytes`` and ``predicted`` are the neighbour's planned bytes and corrected error."""

    choice: dict[str, QuantFormat]
    up: str
    down: str
    nbytes: int
    predicted: float
    value: float


class Neighbourhood:
    """The one-up-one-down moves of plans over fixed options, byte counts and proxy errors.

    "Next larger format" of a group is its allowed format with the fewest bytes above the current
    one (the lower proxy error among equals, then the first listed); "next smaller" likewise
    below. Groups with one allowed format never move.
    """

    def __init__(
        self,
        *,
        options: Mapping[str, Sequence[QuantFormat]],
        group_bytes: Mapping[str, Mapping[QuantFormat, int]],
        proxy: ProxyTable,
    ) -> None:
        self.groups = [g for g, allowed in options.items() if len(allowed) > 1]
        self.group_bytes, self.proxy = group_bytes, proxy
        self._up: dict[str, dict[QuantFormat, QuantFormat | None]] = {}
        self._down: dict[str, dict[QuantFormat, QuantFormat | None]] = {}
        for g in self.groups:
            allowed = list(options[g])
            ranked = sorted(
                allowed, key=lambda f: (group_bytes[g][f], proxy[g][f], allowed.index(f))
            )
            self._up[g], self._down[g] = {}, {}
            for f in allowed:
                size = group_bytes[g][f]
                larger = [h for h in ranked if group_bytes[g][h] > size]
                smaller = [h for h in ranked if group_bytes[g][h] < size]
                self._up[g][f] = larger[0] if larger else None
                # the largest smaller size, the lowest error among formats of that size
                self._down[g][f] = (
                    min(smaller, key=lambda h: (-group_bytes[g][h], ranked.index(h)))
                    if smaller
                    else None
                )

    def moves(
        self, base: Choice, *, fit: ProxyFit, cap_bytes: int | None, rate: float
    ) -> Iterator[Move]:
        """Every move of ``base`` that stays within ``cap_bytes``, best value first (ties in
        group order, so the order is deterministic). ``rate`` is ``λ`` (error per byte)."""
        n = len(self.groups)
        if n < 2:
            return
        base_bytes = sum(self.group_bytes[g][f] for g, f in base.items())
        base_sum = fit.weighted(base, self.proxy)
        up_b, up_e = self._deltas(base, self._up, fit)  # (n,) each, NaN where no move
        down_b, down_e = self._deltas(base, self._down, fit)
        nbytes = base_bytes + up_b[:, None] + down_b[None, :]  # (n_up, n_down)
        weighted = base_sum + up_e[:, None] + down_e[None, :]  # (n_up, n_down)
        valid = np.isfinite(nbytes) & ~np.eye(n, dtype=bool)
        if cap_bytes is not None:
            valid &= nbytes <= cap_bytes
        ups, downs = np.nonzero(valid)  # row-major: group order breaks ties below
        if not len(ups):
            return
        error = fit.values(weighted[ups, downs])
        gain = fit.value(base_sum) - error
        value = gain - rate * (nbytes[ups, downs] - base_bytes)
        for k in np.argsort(-value, kind="stable"):
            up, down = self.groups[ups[k]], self.groups[downs[k]]
            choice = dict(base)
            choice[up] = self._up[up][base[up]]  # type: ignore[assignment]  # valid: not None
            choice[down] = self._down[down][base[down]]  # type: ignore[assignment]
            yield Move(
                choice=choice,
                up=up,
                down=down,
                nbytes=int(nbytes[ups[k], downs[k]]),
                predicted=float(error[k]),
                value=float(value[k]),
            )

    def _deltas(
        self,
        base: Choice,
        step: Mapping[str, Mapping[QuantFormat, QuantFormat | None]],
        fit: ProxyFit,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per group, the bytes and weighted-proxy change of its step from ``base`` (NaN when
        the group has no such step)."""
        dbytes = np.full(len(self.groups), np.nan)
        derror = np.full(len(self.groups), np.nan)
        for i, g in enumerate(self.groups):
            to = step[g][base[g]]
            if to is not None:
                dbytes[i] = self.group_bytes[g][to] - self.group_bytes[g][base[g]]
                derror[i] = fit.weights.get(g, 1.0) * (self.proxy[g][to] - self.proxy[g][base[g]])
        return dbytes, derror


def exchange_rate(front: Sequence[tuple[int, float]], index: int) -> float:
    """The measured frontier's error saved per byte around point ``index`` of ``front``
    (``(bytes, error)`` sorted by bytes, error falling): the slope across its neighbours, the
    one-sided slope at an end, 0 for a lone point."""
    lo, hi = max(index - 1, 0), min(index + 1, len(front) - 1)
    if hi == lo:
        return 0.0
    (b_lo, e_lo), (b_hi, e_hi) = front[lo], front[hi]
    return max(e_lo - e_hi, 0.0) / max(b_hi - b_lo, 1)
