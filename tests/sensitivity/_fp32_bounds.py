"""Worst-case float32 rounding bounds for the log-probabilities, KL and NLL that bitplan computes.

Tests compare bitplan's float32 arithmetic (:mod:`bitplan.sensitivity.divergence`) with an
independent float64 computation on *the same logits*. The allowed gap must follow from the
arithmetic, not from one machine's results, so it is derived here.

Rounding model: every float32 operation, torch's vectorised ``exp`` and ``log`` included,
returns its exact result with a relative error of at most ``EPS`` = 2⁻²³ (one ulp; IEEE
arithmetic gives half of that, the vectorised transcendental functions are accurate to 1 ulp).
The float64 side errs by ~1e-16 relative, nine orders of magnitude below, and is ignored.
The derivation keeps terms of first order in ``EPS``; terms of second order are smaller by a
factor ``EPS · (3R + V)`` ≤ 1e-3 (logit ranges R and class counts V of the tests), and the
factor :data:`SECOND_ORDER` covers them.
"""

from __future__ import annotations

import math

import torch

__all__ = ["EPS", "SECOND_ORDER", "kl_bound", "log_softmax_bound"]

EPS = torch.finfo(torch.float32).eps
# Headroom for the dropped second-order terms (see the module docstring): x2 is far more than
# the 1e-3 relative size they can have.
SECOND_ORDER = 2.0


def log_softmax_bound(logits: torch.Tensor) -> torch.Tensor:
    """Per row of ``[M, V]`` logits: a bound on ``|fl32(log_softmax(x))_i − log_softmax(x)_i|``.

    ``log_softmax(x)_i = (x_i − m) − log Σ_j exp(x_j − m)`` with ``m = max x`` and row range
    ``R = max x − min x``:

    - ``x_j − m`` errs by ≤ EPS·R; ``exp`` of it by a relative EPS·R (argument) + EPS (rounding);
    - the sum of V terms (the largest is 1) by a relative (V − 1)·EPS more, so ``log`` of the
      sum errs by ≤ EPS·(R + V) absolutely, plus EPS·ln V for rounding the log itself;
    - the final subtraction adds EPS·|log p_i| ≤ EPS·(R + ln V).

    Total: EPS·(3R + V + 2 ln V), with R ≤ 2·max|x| taken from the float64 logits.
    """
    x = logits.double()
    vocab = x.shape[-1]
    spread = x.amax(-1) - x.amin(-1)  # (M,)
    return EPS * (3 * spread + vocab + 2 * math.log(vocab))


def _coarsened(logits: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """float64 log-probabilities ``[M, k + 1]``: the ``kept`` ids, then the rest's total mass."""
    logp = torch.log_softmax(logits.double(), -1)
    tail = logp.scatter(-1, kept, -math.inf).logsumexp(-1, keepdim=True)  # (M, 1)
    return torch.cat([logp.gather(-1, kept), tail], dim=-1)


def kl_bound(
    ref_logits: torch.Tensor, logits: torch.Tensor, *, kept: torch.Tensor | None = None
) -> torch.Tensor:
    """Per row: a bound on |bitplan's float32 KL(ref ‖ logits) − the exact one|.

    ``kept``: the ``[M, k]`` ids a top-k reference keeps (None: the exact form). The float32
    KL is ``Σ_b fl(exp(lp_b)) · fl(lp_b − lq_b)`` over n bins (V classes, or the k kept ids
    plus the tail). With per-bin log-probability errors δp and δq:

    - the errors of the differences shift the sum by ≤ Σ p_b (δp + δq) = δp + δq;
    - the relative errors of p (δp + EPS), of the subtraction (EPS), of the product (EPS) and of
      summing n terms ((n − 1)·EPS) scale A = Σ_b p_b·|lp_b − lq_b| by ≤ δp + (n + 2)·EPS.

    On top-k rows the tail's log mass is a log-sum-exp of float32 log-probabilities: their
    error δ plus that of one more log-sum-exp over inputs of the same range R, again ≤ δ;
    every bin is bounded by 2δ.
    """
    dp, dq = log_softmax_bound(ref_logits), log_softmax_bound(logits)
    if kept is None:
        bins = ref_logits.shape[-1]
        lp = torch.log_softmax(ref_logits.double(), -1)
        lq = torch.log_softmax(logits.double(), -1)
    else:
        kept = kept.long()
        bins = kept.shape[-1] + 1
        lp, lq = _coarsened(ref_logits, kept), _coarsened(logits, kept)
        dp, dq = 2 * dp, 2 * dq  # the tail's log-sum-exp: inputs' error + its own rounding
    p = lp.exp()
    spread = torch.where(p > 0, p * (lp - lq).abs(), 0).sum(-1)  # A, (M,)
    return SECOND_ORDER * (dp + dq + spread * (dp + (bins + 2) * EPS))
