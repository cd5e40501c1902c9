"""One exact merge step of the frontier: a Pareto set plus one group's options.

The new set is the Pareto set of ``k`` chains, chain ``j`` being the old set shifted by option
``j`` (:mod:`bitplan.search._frontier_bounds`). Small merges go the textbook way: all ``k·n``
sums, one stable sort by bytes, a running minimum of error. Large ones, where that sort made
500 layers take seconds, first drop the blocks of chains proved dominated, then lay out what is
left as units in bytes order (:mod:`bitplan.search._frontier_units`). A unit keeps exactly its
points with less error than every unit before it (a running minimum over units, then a
bisection inside the unit), so only the points kept are ever materialised, straight into reused
buffers (:mod:`bitplan.search._frontier_scratch`).

Both paths give the same set as brute force, with the conventions of
:mod:`bitplan.search.frontier`: sums are formed as ``error + option error`` exactly as the
textbook merge forms them, among equal bytes the lower error wins, among equal errors the fewer
bytes win, and of identical sums one is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitplan.search._frontier_bounds import candidate_blocks
from bitplan.search._frontier_runs import Runs
from bitplan.search._frontier_scratch import Scratch
from bitplan.search._frontier_units import first_below, indices, spread, units

__all__ = ["Merged", "merge_group"]

# Below this many sums (k·n) the textbook merge is cheaper than proving blocks dominated.
_SMALL = 1 << 16


@dataclass(frozen=True)
class Merged:
    """The merged Pareto set, bytes rising, and its back-pointers (option indices refer to the
    option arrays given to :func:`merge_group`)."""

    bytes: np.ndarray  # int64 (n_points,)
    error: np.ndarray  # float64 (n_points,)
    runs: Runs


def _running_best(err: np.ndarray) -> np.ndarray:
    """``(m,)`` the lowest error strictly before each position (+inf at the first)."""
    best = np.empty(len(err))
    best[0] = np.inf
    if len(err) > 1:
        np.minimum.accumulate(err[:-1], out=best[1:])
    return best


def _chain_filter(nbytes: np.ndarray, err: np.ndarray) -> np.ndarray | None:
    """Positions to keep so that a sequence with bytes non-decreasing and error non-increasing
    becomes a strict chain (equal bytes: the later, lower error; equal error: the earlier,
    fewer bytes); None when it already is one."""
    if len(nbytes) < 2:
        return None
    rising = nbytes[1:] != nbytes[:-1]
    falling = err[1:] != err[:-1]
    if rising.all() and falling.all():
        return None
    keep = np.append(rising, True)  # of equal bytes the last (lowest error)
    keep[1:] &= falling  # of equal errors the first (fewest bytes)
    return np.flatnonzero(keep)


def _textbook(
    cur_bytes: np.ndarray, cur_err: np.ndarray, opt_bytes: np.ndarray, opt_err: np.ndarray
) -> Merged:
    """All ``k·n`` sums sorted by bytes (stable: chain order among equal bytes), then the points
    with less error than everything cheaper."""
    n = len(cur_bytes)
    sums_b = (opt_bytes[:, None] + cur_bytes[None, :]).ravel()  # (k*n,) chain-major
    sums_e = (opt_err[:, None] + cur_err[None, :]).ravel()  # (k*n,)
    order = np.argsort(sums_b, kind="stable")
    err = sums_e[order]
    order = order[err < _running_best(err)]
    nbytes, err = sums_b[order], sums_e[order]
    keep = _chain_filter(nbytes, err)
    if keep is not None:
        order, nbytes, err = order[keep], nbytes[keep], err[keep]
    return Merged(nbytes, err, Runs.of(order % n, order // n))


def _by_blocks(
    cur_bytes: np.ndarray,
    cur_err: np.ndarray,
    opt_bytes: np.ndarray,
    opt_err: np.ndarray,
    scratch: Scratch,
) -> Merged:
    """The merge via proved-dominated blocks and units (module docstring)."""
    blocks = candidate_blocks(cur_bytes, cur_err, opt_bytes, opt_err, scratch)
    laid = units(cur_bytes, opt_bytes, blocks, scratch)
    tail = np.take(cur_err, laid.last)  # each unit's lowest error
    tail += np.take(opt_err, laid.chain)
    bound = _running_best(tail)
    kept = np.flatnonzero(tail < bound)
    laid, bound = laid.take(kept), np.take(bound, kept)
    # Of kept points with equal bytes (single points of different chains) the later has the
    # lower error, having passed the earlier; the earlier goes.
    later = laid.key[1:] == laid.key[:-1]
    if later.any():
        keep = np.flatnonzero(np.append(~later, True))
        laid, bound = laid.take(keep), np.take(bound, keep)
    chain, last = laid.chain, laid.last
    first = first_below(cur_err, opt_err, laid, bound)
    lengths = last - first
    lengths += 1
    offsets = np.cumsum(lengths)
    total = int(offsets[-1])
    offsets -= lengths
    parent = indices(scratch, "parent", first, last + 1)
    nbytes, err = scratch.output(total)
    np.take(cur_bytes, parent, out=nbytes, mode="clip")
    nbytes += spread(scratch, "shift", offsets, np.take(opt_bytes, chain), total)
    option = spread(scratch, "option", offsets, chain, total)
    np.take(cur_err, parent, out=err, mode="clip")
    err += np.take(opt_err, option, out=scratch.get("gain", total, np.float64), mode="clip")
    # Sums of one chain can round to equal errors; of those the first (fewest bytes) stays.
    if total > 1 and not (err[1:] < err[:-1]).all():
        keep = np.flatnonzero(np.append(True, err[1:] < err[:-1]))
        return Merged(nbytes[keep], err[keep], Runs.of(parent[keep], option[keep]))
    # consecutive units of one chain that continue each other form one run
    starts = np.ones(len(chain), dtype=bool)  # (n_units,)
    starts[1:] = (chain[1:] != chain[:-1]) | (first[1:] != last[:-1] + 1)
    runs = Runs(start=offsets[starts], parent=first[starts], option=chain[starts])
    return Merged(nbytes, err, runs)


def merge_group(
    cur_bytes: np.ndarray,
    cur_err: np.ndarray,
    opt_bytes: np.ndarray,
    opt_err: np.ndarray,
    *,
    scratch: Scratch | None = None,
) -> Merged:
    """The Pareto set of ``{(cur_bytes[p] + opt_bytes[j], cur_err[p] + opt_err[j])}``.

    ``cur_*`` must be a strict chain (bytes rising, error falling); options must be sorted by
    bytes with error falling (a pruned group), so that neighbours are each other's rivals.
    With ``scratch`` the result's arrays may be views of its buffers, valid until the merge
    after next with the same ``scratch`` (so a chain of merges may feed each one's output to
    the next); copy them to keep them longer."""
    if len(cur_bytes) * len(opt_bytes) <= _SMALL:
        return _textbook(cur_bytes, cur_err, opt_bytes, opt_err)
    return _by_blocks(cur_bytes, cur_err, opt_bytes, opt_err, scratch or Scratch())
