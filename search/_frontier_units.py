"""The surviving candidate blocks of a merge, laid out in bytes order as *units*.

:func:`bitplan.search._frontier_bounds.candidate_blocks` leaves blocks of consecutive points of
the shifted chains that no proof removed. Most of them overlap no other block in bytes; such a
block is already in order and stays one unit. Where blocks overlap (chains crossing, or two
nearly parallel chains interleaving), the overlapping parts are cut into single points, sorted
by bytes. The merge then keeps of each unit the points with less error than everything before
it, and only those are ever materialised (:mod:`bitplan.search._frontier_merge`).

Per-point index arrays are built as running sums of their changes into reusable buffers
(:mod:`bitplan.search._frontier_scratch`): ``np.repeat`` and ``np.arange`` would allocate fresh
memory on every merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitplan.search._frontier_scratch import Scratch

__all__ = ["Units", "first_below", "indices", "spread", "units"]


def indices(scratch: Scratch, name: str, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Every index of the non-empty ranges ``lo[r] .. hi[r]-1``, in order: a ``(total,)`` int64
    view of scratch buffer ``name``."""
    lengths = hi - lo
    offsets = np.cumsum(lengths) - lengths
    total = int(offsets[-1] + lengths[-1]) if len(lo) else 0
    index = scratch.get(name, total, np.int64)
    if total:
        index.fill(1)  # +1 along a range, a jump from one range's end to the next's start
        index[offsets[0]] = lo[0]
        index[offsets[1:]] = lo[1:] - (hi[:-1] - 1)
        np.cumsum(index, out=index)
    return index


def spread(
    scratch: Scratch, name: str, offsets: np.ndarray, values: np.ndarray, total: int
) -> np.ndarray:
    """``(total,)`` int64 (scratch buffer ``name``): ``values[r]`` on every point of unit ``r``,
    for units of at least one point starting at ``offsets``."""
    out = scratch.get(name, total, np.int64)
    out.fill(0)
    out[offsets[0]] = values[0]
    out[offsets[1:]] = np.diff(values)
    np.cumsum(out, out=out)
    return out


@dataclass(frozen=True)
class Units:
    """Ranges of one chain's points in bytes order: unit ``u`` is points ``first[u]..last[u]``
    of chain ``chain[u]``, whose first point has ``key[u]`` bytes. All ``(n_units,)`` int64."""

    chain: np.ndarray
    first: np.ndarray
    last: np.ndarray
    key: np.ndarray

    def take(self, index: np.ndarray) -> Units:
        """The units ``index`` (in that order)."""
        return Units(*(np.take(v, index) for v in (self.chain, self.first, self.last, self.key)))


def units(
    cur_bytes: np.ndarray,
    opt_bytes: np.ndarray,
    blocks: tuple[np.ndarray, np.ndarray, np.ndarray],
    scratch: Scratch,
) -> Units:
    """The units of ``blocks`` (``(chain, first, last)``), in bytes order.

    With blocks sorted by their first bytes, the points of block ``r`` that another block's
    range may reach are those up to the furthest end of the blocks before it and those from the
    start of the block after it; the points strictly between are the block's own, one unit. The
    others become single-point units, sorted by bytes (points of equal bytes in no particular
    order: the merge keeps the lower error); they never tie an own unit, whose bytes no other
    block reaches."""
    chain, first, last = blocks
    shift = np.take(opt_bytes, chain)
    start = np.take(cur_bytes, first)
    start += shift
    order = np.argsort(start, kind="stable")
    chain, first, last, start, shift = (
        np.take(v, order) for v in (chain, first, last, start, shift)
    )
    stop = last + 1
    own_lo, own_hi = first.copy(), stop.copy()
    if len(chain) > 1:
        end = np.take(cur_bytes, last[:-1])
        end += shift[:-1]
        reach = np.maximum.accumulate(end)  # (n_blocks-1,) the furthest end so far
        reach -= shift[1:]
        own_lo[1:] = np.searchsorted(cur_bytes, reach, side="right")
        own_hi[:-1] = np.searchsorted(cur_bytes, start[1:] - shift[:-1], side="left")
        np.clip(own_lo, first, stop, out=own_lo)
        np.clip(own_hi, first, stop, out=own_hi)
    covered = own_lo >= own_hi  # no point of its own: the whole block is cut up
    own_lo[covered] = stop[covered]
    own_hi[covered] = stop[covered]
    mine = np.flatnonzero(~covered)
    own_key = np.take(cur_bytes, own_lo[mine])
    own_key += shift[mine]
    own = Units(chain[mine], own_lo[mine], own_hi[mine] - 1, own_key)
    # the rest, point by point: the heads [first, own_lo) and tails [own_hi, stop) of blocks
    lo, hi = np.concatenate((first, own_hi)), np.concatenate((own_lo, stop))
    cut = np.flatnonzero(hi > lo)  # range r is the head (r < n_blocks) or tail of block r % n
    if len(cut) == 0:
        return own
    point = indices(scratch, "point", lo[cut], hi[cut])
    owner = spread(
        scratch,
        "point.owner",
        np.cumsum(hi[cut] - lo[cut]) - (hi[cut] - lo[cut]),
        cut % len(chain),
        len(point),
    )
    n_own = len(mine)
    size = n_own + len(point)
    key = scratch.get("unit.key", size, np.int64)
    key[:n_own] = own.key
    np.take(cur_bytes, point, out=key[n_own:], mode="clip")
    key[n_own:] += np.take(shift, owner, out=scratch.get("unit.tmp", len(point), np.int64))
    order = np.argsort(key, kind="stable")
    unit_chain = scratch.get("unit.chain", size, np.int64)
    unit_chain[:n_own] = own.chain
    np.take(chain, owner, out=unit_chain[n_own:], mode="clip")
    unit_first = scratch.get("unit.first", size, np.int64)
    unit_first[:n_own] = own.first
    unit_first[n_own:] = point
    unit_last = scratch.get("unit.last", size, np.int64)
    unit_last[:n_own] = own.last
    unit_last[n_own:] = point
    return Units(
        np.take(unit_chain, order),
        np.take(unit_first, order),
        np.take(unit_last, order),
        np.take(key, order),
    )


def first_below(
    cur_err: np.ndarray, opt_err: np.ndarray, of: Units, bound: np.ndarray
) -> np.ndarray:
    """Per unit, its first point whose sum ``E[p] + e_j`` is below ``bound`` (``last + 1``
    when none is): a bisection on the exact sums (which fall along a unit), run only for the
    units that their first point does not settle."""
    e = np.take(opt_err, of.chain)
    head = np.take(cur_err, of.first)
    head += e
    open_ = np.flatnonzero(head >= bound)
    if len(open_) == 0:
        return of.first
    answer = of.first.copy()
    # invariant: the answer is in [lo, hi]; hi = last + 1 stands for "none"
    lo, hi = np.take(of.first, open_), np.take(of.last, open_) + 1
    e, bound = np.take(e, open_), np.take(bound, open_)
    while (lo < hi).any():
        mid = (lo + hi) // 2
        value = np.take(cur_err, np.minimum(mid, len(cur_err) - 1))
        value += e
        below = (value < bound) & (mid < hi)
        hi = np.where(below, mid, hi)
        lo = np.where(below | (lo >= hi), lo, mid + 1)
    answer[open_] = lo
    return answer
