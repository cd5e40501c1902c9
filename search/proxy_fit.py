"""Correcting the additive proxy from measured trials, and the gap between the two.

The exact frontier ranks plans by the proxy ``p = Σ_g e_g``: the sum of the groups'
sensitivities (:mod:`bitplan.search.problem`). What the search measures differs in three ways,
and the correction models each of them, on the log scale (errors span decades, and a factor off
matters as much for a small error as for a large one):

* **scale**: the proxy's unit is not the measured metric's (a layer-output error against a KL
  or an accuracy drop), so ``log y = a + log p`` at the least;
* **compounding**: errors of quantized layers add up super-linearly (a later layer sees the
  earlier layers' noise), so ``log y = a + b · log p``, a monotone power law (``b > 1``);
* **per-group misranking**: some groups matter more downstream than their local error says
  (HAWQ's Hessian weighting, Dong et al. 2019, is the same observation), so each group gets a
  multiplicative weight ``w_g``: ``ŷ = exp(a) · (Σ_g w_g · e_g)^b``.

Why per-group weights and not only the global fit: a monotone transform of the whole sum never
changes which of two one-up-one-down neighbours of one plan the proxy prefers (both sit at
nearly the same ``p``), so it cannot steer local moves; group weights can. With a few dozen
trials and as many groups the weights are underdetermined, so they are shrunk towards 1 (a
ridge penalty on ``log w_g``) and ``b`` towards 1. The fit is Gauss-Newton on the log residuals
(a handful of steps from ``w = 1, b = 1``); the penalty is chosen among a few strengths, and the
global-only models among them, by leave-one-out error (the ridge hat-matrix identity
``r_i / (1 - h_ii)``), so the correction is only as rich as the trials support, and the plain
scaled proxy wins whenever nothing richer predicts held-out trials better.

The prediction stays monotone in every group's error (``w_g > 0``, ``b > 0``), so "a format up
never hurts" still holds for the corrected proxy. References: Dong et al., "HAWQ" (ICCV 2019);
Hastie, Tibshirani & Friedman, *The Elements of Statistical Learning* (2009), §7.10 (LOO for
linear smoothers).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import linalg, stats

from bitplan.search.points import Choice, Point
from bitplan.search.problem import Problem
from bitplan.sensitivity.format_spec import QuantFormat

__all__ = [
    "ProxyFit",
    "ProxyGap",
    "ProxyTable",
    "fit_proxy",
    "predicted",
    "proxy_gap",
    "proxy_table",
]

logger = logging.getLogger(__name__)

# Per group: the additive proxy's error of each allowed format.
ProxyTable = Mapping[str, Mapping[QuantFormat, float]]

# Ridge strengths on log w_g tried by leave-one-out (None: no group weights). A share of 1 with a
# penalty of 1 weighs like one trial: from "almost free" to "a few trials' worth of prior".
_RIDGES: tuple[float | None, ...] = (None, 10.0, 3.0, 1.0, 0.3, 0.1)
# Prior strength that keeps the power b near 1 (one trial's worth): near the cap the trials
# span a narrow range of p, where a free slope would chase noise.
_POWER_PRIOR = 1.0
_POWER_RANGE = (0.2, 5.0)  # beyond this the power law is an artefact of a few points
_GN_STEPS = 6  # Gauss-Newton from w = 1 converges in 3-4 steps for weights within 10x of 1
# Trials used per fit, those nearest the cap in bytes: decisions are made near the budget, and a
# bound keeps a long run's refits cheap.
MAX_FIT_TRIALS = 128


def proxy_table(problem: Problem) -> dict[str, dict[QuantFormat, float]]:
    """``{group: {format: proxy error}}`` of a problem, as the measured search takes it."""
    return {g.key: dict(zip(g.formats, map(float, g.error), strict=True)) for g in problem.groups}


def predicted(choice: Choice, proxy: ProxyTable) -> float:
    """The additive proxy's error of a choice."""
    return sum(proxy[g][f] for g, f in choice.items())


@dataclass(frozen=True)
class ProxyFit:
    """``ŷ = exp(log_scale) · (Σ_g weights[g] · e_g)^power`` (a missing weight is 1).

    ``model`` names what the fit uses (``identity``, ``scale``, ``power``, ``groups``);
    ``loo_error`` is its median leave-one-out ``|log(ŷ / y)|`` on the trials it was fitted to,
    ``scale_loo_error`` the same for the scaled proxy alone (NaN below two trials).
    """

    log_scale: float = 0.0
    power: float = 1.0
    weights: Mapping[str, float] = field(default_factory=dict)
    model: str = "identity"
    trials: int = 0
    loo_error: float = math.nan
    scale_loo_error: float = math.nan

    def weighted(self, choice: Choice, proxy: ProxyTable) -> float:
        """``Σ_g w_g · e_g`` of a choice."""
        return sum(self.weights.get(g, 1.0) * proxy[g][f] for g, f in choice.items())

    def value(self, weighted: float) -> float:
        """The corrected error of a plan whose weighted proxy sum is ``weighted``."""
        return float(self.values(np.asarray(weighted, dtype=np.float64)))

    def values(self, weighted: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """:meth:`value` of many weighted sums at once (any shape; negatives count as 0)."""
        out: npt.NDArray[np.float64] = np.exp(self.log_scale) * (
            np.maximum(weighted, 0.0) ** self.power
        )
        return out

    def predict(self, choice: Choice, proxy: ProxyTable) -> float:
        """The corrected proxy's error of a choice."""
        return self.value(self.weighted(choice, proxy))


@dataclass(frozen=True)
class _Candidate:
    power: bool
    ridge: float | None

    @property
    def name(self) -> str:
        return "groups" if self.ridge is not None else "power" if self.power else "scale"


def fit_proxy(samples: Sequence[tuple[Choice, float]], proxy: ProxyTable) -> ProxyFit:
    """The correction of ``proxy`` that best predicts the measured errors of ``samples``
    (``(choice, measured error)`` pairs) left out one at a time; see the module docstring.

    Samples with a non-positive or non-finite error or proxy error carry no log-scale
    information and are skipped; below two usable samples the fit is the identity (or a scale).
    """
    groups = list(proxy)
    rows = [
        ([proxy[g][c[g]] for g in groups], y)
        for c, y in samples
        if math.isfinite(y) and y > 0 and predicted(c, proxy) > 0
    ]
    if not rows:
        return ProxyFit()
    errors = np.asarray([r[0] for r in rows], dtype=np.float64)  # (n, n_groups)
    log_y = np.log(np.asarray([r[1] for r in rows], dtype=np.float64))  # (n,)
    scale = _Candidate(power=False, ridge=None)
    if len(rows) < 2:
        return ProxyFit(
            log_scale=float(log_y[0] - np.log(errors[0].sum())), model="scale", trials=1
        )
    fits = {}
    for candidate in [scale, _Candidate(True, None), *(_Candidate(True, r) for r in _RIDGES if r)]:
        fits[candidate] = _gauss_newton(errors, log_y, candidate)
    best = min(fits, key=lambda c: fits[c][3])  # dict order: the simpler model wins ties
    a, b, u, _, loo = fits[best]
    weights = {g: float(w) for g, w in zip(groups, np.exp(u), strict=True) if w != 1.0}
    return ProxyFit(
        log_scale=a,
        power=b,
        weights=weights,
        model=best.name,
        trials=len(rows),
        loo_error=float(np.median(np.abs(loo))),
        scale_loo_error=float(np.median(np.abs(fits[scale][4]))),
    )


def _gauss_newton(
    errors: np.ndarray, log_y: np.ndarray, candidate: _Candidate
) -> tuple[float, float, np.ndarray, float, np.ndarray]:
    """``(a, b, log w, mean squared LOO residual, LOO residuals)`` of one candidate model.

    Parameters: ``a`` (free), ``b`` (pulled to 1 when the candidate fits a power, else fixed at
    1) and ``log w`` (pulled to 0 with the candidate's ridge, else fixed at 0). Each step solves
    the penalised least squares of the model linearised at the current parameters.
    """
    n, n_groups = errors.shape
    a, b = float(np.mean(log_y - np.log(errors.sum(axis=1)))), 1.0
    u = np.zeros(n_groups)
    prior = np.diag([0.0] + [_POWER_PRIOR] * candidate.power)  # (m, m) on [a, b?]
    for done in range(_GN_STEPS + 1):
        free, shares, resid = _linearise(errors, log_y, a, b, u, candidate)
        offset = np.r_[0.0, [b - 1.0] * candidate.power]  # [a, b?] minus their prior means
        taken_at_u = resid if shares is None else resid + shares @ u
        step, u_new, leave = _penalised_step(
            free, shares, taken_at_u, prior, offset, candidate.ridge
        )
        if done == _GN_STEPS:  # the last pass only measures the fit: its leverages at convergence
            break
        a += float(step[0])
        if candidate.power:
            b = float(np.clip(b + step[1], *_POWER_RANGE))
        if shares is not None:
            u = u_new
    loo = resid / np.maximum(leave, 1e-9)  # 1e-9: a point the fit interpolates has no LOO
    return a, b, u, float(np.mean(loo**2)) if n > 1 else math.inf, loo


def _penalised_step(
    free: np.ndarray,
    shares: np.ndarray | None,
    resid: np.ndarray,
    prior: np.ndarray,
    offset: np.ndarray,
    ridge: float | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Gauss-Newton step: ``(Δ[a, b?], new log w, diag(I - H))``.

    Minimises ``|r - F·Δ - S·(v - u)|² + (Δ + offset)ᵀ P (Δ + offset) + ridge·|v|²`` over the
    step ``Δ`` of the free columns ``F`` and the new log weights ``v`` (``S``: the columns of
    the log weights; the caller adds ``S·u`` to ``resid``, so that the unknown is ``v``, not its
    change). Eliminating ``v`` leaves generalised least squares in ``Δ`` with the
    ``(n, n)`` matrix ``M = ridge·(S·Sᵀ + ridge·I)⁻¹`` (the dual of ridge regression), so a
    step costs ``O(n²·groups + n³)`` however many groups the model has. ``H`` is the
    smoother's hat matrix, whose diagonal gives leave-one-out residuals ``r_i / (1 - h_ii)``.
    """
    n = len(resid)
    if shares is None:
        metric = np.eye(n)  # (n, n): no log weights, plain penalised least squares
    else:
        assert ridge is not None
        gram = linalg.cho_factor(shares @ shares.T + ridge * np.eye(n))  # positive definite
        metric = ridge * linalg.cho_solve(gram, np.eye(n))  # (n, n)
    weighted_free = metric @ free  # (n, m)
    normal = free.T @ weighted_free + prior  # (m, m)
    step = np.linalg.solve(normal, weighted_free.T @ resid - prior @ offset)
    fitted_resid = metric @ (resid - free @ step)  # (n,) residual of the step's fit
    leave = np.diag(metric) - np.einsum(
        "im,mk,ik->i", weighted_free, np.linalg.inv(normal), weighted_free
    )  # (n,) diagonal of I - H
    if shares is None:
        return step, np.zeros(0), leave
    assert ridge is not None
    return step, shares.T @ fitted_resid / ridge, leave


def _linearise(
    errors: np.ndarray, log_y: np.ndarray, a: float, b: float, u: np.ndarray, candidate: _Candidate
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The Jacobian of ``log ŷ`` at the current parameters, split into its free columns
    ``(n, m)`` (``a``, and ``b`` for a power) and its log-weight columns ``(n, groups)`` (None
    without weights), and the residuals ``log y - log ŷ`` ``(n,)``."""
    weighted = errors * np.exp(u)  # (n, n_groups)
    total = np.maximum(weighted.sum(axis=1), 1e-300)  # (n,) guards log(0) of an all-zero row
    resid = log_y - (a + b * np.log(total))
    columns = [np.ones_like(total)]
    if candidate.power:
        columns.append(np.log(total))
    free = np.column_stack(columns)  # (n, 1 + power)
    if candidate.ridge is None:
        return free, None, resid
    shares = b * weighted / total[:, None]  # (n, n_groups): d log ŷ / d log w_g
    return free, shares, resid


@dataclass(frozen=True)
class ProxyGap:
    """How far the proxy is from what the search measured, over its measured trials.

    ``median_ratio``: median of measured / predicted error (the proxy's scale against the
    metric's). ``spearman``: rank correlation of predicted and measured errors (1: the proxy
    orders plans as the measurements do). ``scaled_error`` and ``corrected_error``: median
    leave-one-out ``|log(measured / prediction)|`` of the proxy times one fitted scale and of the
    corrected proxy (:class:`ProxyFit`), on the trials the correction was fitted to; 0.1 means
    predictions about 10 % off. NaN where too few trials give a number.
    """

    trials: int
    median_ratio: float
    spearman: float
    scaled_error: float
    corrected_error: float
    correction: str

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "trials": self.trials,
            "median_ratio": self.median_ratio,
            "spearman": self.spearman,
            "scaled_error": self.scaled_error,
            "corrected_error": self.corrected_error,
            "correction": self.correction,
        }


def proxy_gap(points: Sequence[Point], proxy: ProxyTable, fit: ProxyFit) -> ProxyGap:
    """The gap over every measured point (a finite calibration error) and ``fit``'s errors."""
    pairs = np.asarray(
        [(predicted(p.choice, proxy), p.error) for p in points if math.isfinite(p.error)],
        dtype=np.float64,
    ).reshape(-1, 2)  # (n, 2): predicted, measured
    positive = pairs[(pairs > 0).all(axis=1)]
    ratio = float(np.median(positive[:, 1] / positive[:, 0])) if len(positive) else math.nan
    rho = math.nan
    if len(pairs) >= 3 and np.ptp(pairs[:, 0]) > 0 and np.ptp(pairs[:, 1]) > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ties are fine: spearmanr ranks them averaged
            rho = float(stats.spearmanr(pairs[:, 0], pairs[:, 1]).statistic)
    return ProxyGap(
        trials=len(pairs),
        median_ratio=ratio,
        spearman=rho,
        scaled_error=fit.scale_loo_error,
        corrected_error=fit.loo_error,
        correction=fit.model,
    )
