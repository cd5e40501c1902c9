"""Proofs that whole blocks of candidate plans are dominated, so the merge never looks at them.

Merging a group with ``k`` options into a Pareto set ``F`` (``n`` points, bytes ``B`` rising,
error ``E`` falling) means taking the Pareto set of ``k`` *chains*: chain ``j`` is ``F`` shifted
by option ``j``, point ``p`` at ``(B[p] + b_j, E[p] + e_j)``. Almost all ``k·n`` candidates are
dominated, and in long stretches: chain ``j`` is beaten by a cheaper option below some size and
by a richer one above another, with a narrow band of interleaving where two chains cross. This
module proves, for aligned blocks of a chain, that every point of the block is dominated by a
*rival* chain (a nearby option), refining blocks (``FAN`` children each) only where no proof
holds, down to blocks of ``LEAF`` points; what survives goes to the exact merge of
:mod:`bitplan.search._frontier_merge`, whose result does not depend on how good the proofs are,
only on their soundness.

Two proofs, both sound for a whole block ``[a, c]`` of chain ``j`` against rival ``i``:

* **box**: the rival's best point with bytes ``<= B[a] + b_j`` already has less error than the
  block's *lowest* error ``E[c] + e_j``; every point of the block has at least those bytes.
* **line**: the rival's staircase (error as a function of bytes) lies under a line of slope
  ``σ`` on the bytes the block can see, and the block's points lie above a parallel line that is
  higher. ``σ`` is a block's chord slope, so the two lines follow the frontier's local slope and
  the proof holds close to where two chains cross, where the box proof (which pays the block's
  whole error drop) gives up many blocks earlier. Per aligned block of ``F`` we keep its origin,
  its chord slope and two residuals (``upper``: of the staircase above the chord line;
  ``lower``: of the points below it); a coarser level's residuals are bounded from its
  children's, so only the finest level costs a pass over ``F``.

The line proof is done in floating point with a margin (``_TOL`` times the size of the numbers
involved) far above rounding; the box proof compares the very sums the merge would compare.
Measured on 500 LLaMA-shaped layers, the line proof removes 99% of the blocks removed. The
bounding idea is that of branch-and-bound for the multiple-choice knapsack (Kellerer, Pferschy
& Pisinger, *Knapsack Problems*, 2004, ch. 11), applied to the Nemhauser–Ullmann merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitplan.search._frontier_scratch import Scratch

__all__ = ["LEAF", "candidate_blocks"]

# Blocks are proved dominated from at most TOP blocks per chain down to LEAF points, FAN times
# finer at each level. Measured on 500 LLaMA-shaped layers, smaller leaves cost more in proofs
# than they save in the merge, larger ones the other way round.
TOP = 64
FAN = 4
LEAF = 256
# The rivals tried against chain j: the nearest cheaper and richer options, which bound a chain's
# surviving stretch on either side; the second nearest matter where an option between is itself
# poor (measured: with 12 formats they save 15% of the time, with 8 they cost nothing).
_RIVALS = (-1, 1, -2, 2)
# Margin of the line proof, relative to the size of the numbers compared: rounding is ~1e-16.
_TOL = 1e-10


@dataclass(frozen=True)
class _Level:
    """Line bounds of the aligned blocks of ``size`` points of ``F``: on block ``β`` the
    staircase (``E[q]`` from ``B[q]`` up to ``B[q+1]``) lies below
    ``slope[β]·(x - origin[β]) + upper[β]`` and every point lies on or above
    ``slope[β]·(x - origin[β]) + lower[β]``. ``upper`` is +inf for the last block, whose last
    step never ends."""

    size: int
    first: np.ndarray  # int64 (n_blocks,) index of each block's first point
    last: np.ndarray  # int64 (n_blocks,) index of each block's last point
    origin: np.ndarray  # float64 (n_blocks,) bytes of the first point
    slope: np.ndarray  # float64 (n_blocks,) chord slope (0 for one-point blocks)
    upper: np.ndarray  # float64 (n_blocks,)
    lower: np.ndarray  # float64 (n_blocks,)


def _chords(
    bytes_f: np.ndarray, err: np.ndarray, first: np.ndarray, last: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Origins and chord slopes of the blocks ``first..last``."""
    origin = bytes_f[first]
    width = bytes_f[last] - origin
    wide = width > 0
    slope = np.zeros(len(first))
    slope[wide] = (err[last[wide]] - err[first[wide]]) / width[wide]
    return origin, slope


def _finest(bytes_f: np.ndarray, err: np.ndarray, size: int, scratch: Scratch) -> _Level:
    """Exact residuals of the blocks of ``size`` points (one pass over ``F``)."""
    n = len(bytes_f)
    n_blocks = -(-n // size)
    first = np.arange(n_blocks, dtype=np.int64) * size
    last = np.minimum(first + size, n) - 1
    origin, slope = _chords(bytes_f, err, first, last)
    padded = n_blocks * size
    # In place, on two buffers: large temporaries cost page faults on every merge.
    line = scratch.get("finest.line", padded, np.float64)
    line[:n] = bytes_f
    line[n:] = bytes_f[-1]
    grid = line.reshape(n_blocks, size)  # (n_blocks, size) bytes of each point
    grid -= origin[:, None]
    grid *= slope[:, None]  # now the chord line's rise at each point
    residual = scratch.get("finest.residual", padded, np.float64)
    residual[:n] = err
    residual[n:] = np.inf
    res_grid = residual.reshape(n_blocks, size)  # (n_blocks, size)
    res_grid -= grid  # each point's error above its block's chord line
    lower = res_grid.min(axis=1)
    # each staircase step's value minus the line at its right end (the next point's bytes)
    np.subtract(bytes_f[1:], bytes_f[:-1], out=line[: n - 1])
    line[n - 1 :] = 0.0
    grid *= slope[:, None]
    res_grid -= grid
    residual[n - 1 :] = -np.inf  # padding, and the last step, which never ends
    upper = res_grid.max(axis=1)
    upper[-1] = np.inf
    return _Level(size, first, last, origin, slope, upper, lower)


def _coarser(bytes_f: np.ndarray, err: np.ndarray, child: _Level) -> _Level:
    """Residuals of blocks of ``FAN`` children, bounded from the children's (no pass over F):
    on a child the parent's residual differs from the child's by a linear function of bytes,
    whose extreme lies at one end of the child's range."""
    n = len(bytes_f)
    n_child = len(child.first)
    n_blocks = -(-n_child // FAN)
    first = child.first[::FAN]
    last = np.minimum(first + child.size * FAN, n) - 1
    origin, slope = _chords(bytes_f, err, first, last)

    def grid(values: np.ndarray, fill: float) -> np.ndarray:
        out = np.full(n_blocks * FAN, fill)
        out[:n_child] = values
        return out.reshape(n_blocks, FAN)  # (n_blocks, FAN) children of each block

    c_origin, c_slope = grid(child.origin, 0.0), grid(child.slope, 0.0)

    def shift(x: np.ndarray) -> np.ndarray:  # parent residual minus child residual at bytes x
        out: np.ndarray = c_slope * (x - c_origin) - slope[:, None] * (x - origin[:, None])
        return out

    nxt = np.minimum(child.first + 1, n - 1), np.minimum(child.last + 1, n - 1)
    lo_x, hi_x = grid(bytes_f[nxt[0]], 0.0), grid(bytes_f[nxt[1]], 0.0)
    upper = np.max(grid(child.upper, -np.inf) + np.maximum(shift(lo_x), shift(hi_x)), axis=1)
    lo_x, hi_x = grid(bytes_f[child.first], 0.0), grid(bytes_f[child.last], 0.0)
    lower = np.min(grid(child.lower, np.inf) + np.minimum(shift(lo_x), shift(hi_x)), axis=1)
    upper[-1] = np.inf
    return _Level(child.size * FAN, first, last, origin, slope, upper, lower)


def _levels(bytes_f: np.ndarray, err: np.ndarray, scratch: Scratch) -> list[_Level]:
    """Finest level first; the coarsest has at most ``TOP`` blocks (coarser ones would prove
    almost nothing: a chain's dominated stretches are a good part of it, not all of it)."""
    levels = [_finest(bytes_f, err, LEAF, scratch)]
    while len(levels[-1].first) > TOP:
        levels.append(_coarser(bytes_f, err, levels[-1]))
    return levels


def _line_proof(
    level: _Level,
    block: np.ndarray,
    rival_at: tuple[np.ndarray, np.ndarray],
    ends: tuple[np.ndarray, np.ndarray],
    shift: np.ndarray,
    errors: tuple[np.ndarray, np.ndarray],
    margin: float,
) -> np.ndarray:
    """The line proof for blocks ``block`` (of this level) of chain ``j`` against rival ``i``.

    ``rival_at`` are the rival points (indices in F) at the block's two ends, ``ends`` the
    bytes of the block's first and last points in F, ``shift`` = ``b_j - b_i`` and ``errors``
    = ``(e_j, e_i)``. The rival's points seen by the block lie in at most two blocks of the
    level (else no proof); the upper line of each must pass below the block's lower line at both
    ends, by ``margin``."""
    qa, qc = rival_at
    b1, b2 = qa // level.size, qc // level.size
    proved: np.ndarray = (qa >= 0) & (b2 - b1 <= 1)
    np.maximum(b1, 0, out=b1)
    own, rival = errors
    # the block's lower line (less the margin) at its first point, its origin, and at its last
    low_a = level.lower[block] + own
    low_a -= margin
    width = ends[1] - ends[0]
    low_c = level.slope[block] * width
    low_c += low_a
    for b in (b1, b2):
        slope, base = level.slope[b], level.upper[b] + rival
        x = ends[0] + shift
        x -= level.origin[b]  # the block's first point, seen from rival block b's origin
        up = slope * x
        up += base
        proved &= up < low_a
        x += width
        np.multiply(slope, x, out=up)
        up += base
        proved &= up < low_c
    return proved


def _dominated(
    frontier: tuple[np.ndarray, np.ndarray, np.ndarray],
    options: tuple[np.ndarray, np.ndarray],
    level: _Level,
    chain: np.ndarray,
    block: np.ndarray,
    margin: float,
) -> np.ndarray:
    """``(m,)`` bool: block ``block[t]`` of chain ``chain[t]`` is proved dominated by one of
    its rivals (all pairs of block and rival in one vectorised pass)."""
    cur_bytes, bytes_f, err = frontier
    opt_bytes, opt_err = options
    # rival-major, so that each rival's queries below rise with the blocks (a chain at a time):
    # the binary searches then walk memory in order
    rivals = np.array(_RIVALS)[:, None] + chain[None, :]  # (n_rivals, m)
    pair = np.flatnonzero(((rivals >= 0) & (rivals < len(opt_bytes))).ravel())
    item = pair % len(chain)
    i, j, blk = rivals.ravel()[pair], chain[item], block[item]
    shift = opt_bytes[j] - opt_bytes[i]
    a, c = level.first[blk], level.last[blk]
    queries = np.concatenate((cur_bytes[a] + shift, cur_bytes[c] + shift))
    found = np.searchsorted(cur_bytes, queries, side="right") - 1
    qa, qc = found[: len(pair)], found[len(pair) :]
    own, rival = opt_err[j], opt_err[i]
    proved = (qa >= 0) & (err[qa] + rival < err[c] + own)  # the box proof
    proved |= _line_proof(
        level,
        blk,
        (qa, qc),
        (bytes_f[a], bytes_f[c]),
        shift.astype(np.float64),
        (own, rival),
        margin,
    )
    dead = np.zeros(len(chain), dtype=bool)
    dead[item[proved]] = True
    return dead


def candidate_blocks(
    cur_bytes: np.ndarray,
    cur_err: np.ndarray,
    opt_bytes: np.ndarray,
    opt_err: np.ndarray,
    scratch: Scratch,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(chain, first, last)`` of the blocks (at most ``LEAF`` points each) that no proof
    removes; every candidate outside them is dominated by another candidate."""
    bytes_f = scratch.get("bytes_f", len(cur_bytes), np.float64)
    bytes_f[:] = cur_bytes  # exact: sizes stay far below 2**53
    levels = _levels(bytes_f, cur_err, scratch)
    # Every number the line proof adds up is at most a few times the largest error or option
    # error in size; rounding errors are ~1e-16 of that, the margin far above them.
    margin = _TOL * (8 * max(abs(cur_err[0]), abs(cur_err[-1])) + 2 * np.abs(opt_err).max())
    frontier, options = (cur_bytes, bytes_f, cur_err), (opt_bytes, opt_err)
    top = levels[-1]
    k = len(opt_bytes)
    chain = np.repeat(np.arange(k, dtype=np.int64), len(top.first))
    block = np.tile(np.arange(len(top.first), dtype=np.int64), k)
    for depth in range(len(levels) - 1, 0, -1):
        live = ~_dominated(frontier, options, levels[depth], chain, block, margin)
        children = (block[live, None] * FAN + np.arange(FAN)[None, :]).ravel()  # (m*FAN,)
        inside = children < len(levels[depth - 1].first)
        chain, block = np.repeat(chain[live], FAN)[inside], children[inside]
    live = ~_dominated(frontier, options, levels[0], chain, block, margin)
    chain, block = chain[live], block[live]
    return chain, levels[0].first[block], levels[0].last[block]
