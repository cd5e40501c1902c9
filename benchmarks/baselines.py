"""Two published mixed-precision allocators, re-implemented as baselines for bitplan's frontier.

bitplan claims its frontier beats the allocators people already use. To make that claim
checkable, this module implements two of them on the same planning problem
(:class:`bitplan.search.problem.Problem`: one format per layer or tie group, exact bytes per
option):

* **Greedy sensitivity-ordered promotion** — the "Pareto-curve greedy" of Qualcomm AIMET's
  *Automatic Mixed Precision* (AIMET documentation, "Automatic Mixed Precision (AMP)"). AIMET
  measures, per layer group and candidate, the model's accuracy drop when only that group is
  quantized (bitplan's ``e2e`` method measures the same thing), then walks from the cheapest
  assignment upward, each step taking the promotion with the largest accuracy gain per unit of
  cost. :func:`greedy_promotion` does this with bytes as the cost, stopping when no promotion
  fits the budget.
* **ILP on Hessian-trace-weighted error** — HAWQ-V3 (Yao et al., "HAWQ-V3: Dyadic Neural
  Network Quantization", ICML 2021). A layer's sensitivity to format ``f`` is
  ``Ω_l(f) = Tr(H_l) / n_l · ‖Q_f(W_l) − W_l‖²`` with ``Tr(H_l)`` the trace of the loss Hessian
  over the layer's weights, estimated by Hutchinson's method (``E[vᵀHv]`` over Rademacher
  ``v``; Hutchinson, 1990; Yao et al., "PyHessian", 2020), and the assignment minimising
  ``Σ Ω`` under the size budget is found by an integer linear program
  (:func:`ilp_allocation`, solved with SciPy's HiGHS ``milp``).

Both return a plan as ``{group key: format}``, the shape bitplan's own searches return.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.optimize import Bounds, LinearConstraint, milp
from torch.nn.attention import SDPBackend, sdpa_kernel

from bitplan.search.problem import Group, Problem
from bitplan.sensitivity.data import CLASSIFICATION_TASKS, CalibData
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import QuantFormat, fake_quantize, parse_format
from bitplan.sensitivity.layers import get_weight, weight_matrix
from bitplan.sensitivity.metrics import forward_output
from bitplan.sensitivity.models import LoadedModel

__all__ = ["calibration_loss", "greedy_promotion", "hawq_table", "hessian_traces", "ilp_allocation"]

logger = logging.getLogger(__name__)


def _floor(problem: Problem) -> int:
    return sum(int(g.bytes.min()) for g in problem.groups)


def _check_cap(problem: Problem, cap: int) -> None:
    floor = _floor(problem)
    if cap < floor:
        raise InputError(
            f"cap of {cap} planned bytes is below the smallest reachable "
            f"{floor}; give a cap of at least {floor}"
        )


def _chain(group: Group) -> list[int]:
    """The group's options that no other option beats on both bytes and error, cheapest first
    (error then strictly falls along the chain, so every promotion costs bytes)."""
    chain: list[int] = []
    for i in np.lexsort((group.error, group.bytes)):  # by bytes, then error
        if not chain or group.error[i] < group.error[chain[-1]]:
            chain.append(int(i))
    return chain


def greedy_promotion(problem: Problem, cap: int) -> dict[str, QuantFormat]:
    """AIMET-AMP-style greedy: start every group at its cheapest option, then repeatedly take
    the promotion (to any costlier, more accurate option of one group) with the largest error
    drop per extra byte that still fits ``cap`` planned bytes; stop when none fits."""
    _check_cap(problem, cap)
    chains = [_chain(g) for g in problem.groups]
    at = [0] * len(chains)  # position of each group along its chain
    used = sum(int(g.bytes[c[0]]) for g, c in zip(problem.groups, chains, strict=True))
    while True:
        best: tuple[float, int, int] | None = None  # (gain per byte, group, chain position)
        for gi, (group, chain) in enumerate(zip(problem.groups, chains, strict=True)):
            now = chain[at[gi]]
            for pos in range(at[gi] + 1, len(chain)):
                extra = int(group.bytes[chain[pos]] - group.bytes[now])
                if used + extra > cap:
                    break  # the chain only gets costlier
                gain = float(group.error[now] - group.error[chain[pos]]) / extra
                if best is None or gain > best[0]:
                    best = (gain, gi, pos)
        if best is None:
            break
        _, gi, pos = best
        group = problem.groups[gi]
        used += int(group.bytes[chains[gi][pos]] - group.bytes[chains[gi][at[gi]]])
        at[gi] = pos
    return problem.choice_of([c[a] for c, a in zip(chains, at, strict=True)])


def ilp_allocation(problem: Problem, cap: int) -> dict[str, QuantFormat]:
    """HAWQ-V3's ILP: one binary variable per (group, option), exactly one option per group,
    total bytes <= ``cap``, minimising the summed error of the chosen options."""
    _check_cap(problem, cap)
    sizes = [len(g.formats) for g in problem.groups]
    starts = np.cumsum([0, *sizes])
    error = np.concatenate([g.error for g in problem.groups])
    nbytes = np.concatenate([g.bytes for g in problem.groups]).astype(np.float64)
    one_each = np.zeros((len(sizes), len(error)))  # (groups, variables)
    for gi, (lo, hi) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
        one_each[gi, lo:hi] = 1.0
    # Errors can be ~1e-9 (int8 on a robust layer): scaled to at most 1 so that HiGHS's
    # absolute optimality tolerances do not treat them all as equal.
    scale = float(np.abs(error).max()) or 1.0
    result = milp(
        c=error / scale,
        integrality=np.ones(len(error)),
        bounds=Bounds(0, 1),
        constraints=[
            LinearConstraint(one_each, 1, 1),
            LinearConstraint(nbytes[None, :], -np.inf, cap),
        ],
    )  # (1, vars)
    if result.x is None:
        raise RuntimeError(f"the ILP solver found no plan under {cap} bytes: {result.message}")
    picked = [
        int(np.argmax(result.x[lo:hi])) for lo, hi in zip(starts[:-1], starts[1:], strict=True)
    ]
    choice = problem.choice_of(picked)
    used = problem.cost(choice)[0]
    if used > cap:  # the solver's feasibility tolerance let a rounded plan overshoot
        raise RuntimeError(f"the ILP plan takes {used} bytes, over the cap of {cap}")
    return choice


def calibration_loss(
    model: LoadedModel, batch: dict[str, torch.Tensor], labels: torch.Tensor | None
) -> torch.Tensor:
    """The loss whose Hessian HAWQ-V3 weighs errors by: cross-entropy against ``labels`` for
    classifiers (the model's own top-1 when there are none), next-token cross-entropy over the
    real tokens for causal LMs."""
    logits = forward_output(model, batch)
    if model.task in CLASSIFICATION_TASKS:
        target = labels if labels is not None else logits.argmax(dim=-1).detach()
        return F.cross_entropy(logits, target)
    if model.task == "text-generation":
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        counted = real[:, :-1] & real[:, 1:]  # (B, T-1): the input and its next token real
        return F.cross_entropy(logits[:, :-1][counted], ids[:, 1:][counted])  # (M, V), (M,)
    raise InputError(
        f"HAWQ-V3 needs a loss; task {model.task!r} has none here (accepted: "
        f"{', '.join((*CLASSIFICATION_TASKS, 'text-generation'))})"
    )


def _labelled_batches(
    data: CalibData, batch_size: int, device: torch.device
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
    start = 0
    for batch in data.batches(batch_size, device=device):
        n = next(iter(batch.values())).shape[0]
        labels = None if data.labels is None else data.labels[start : start + n].to(device)
        yield batch, labels
        start += n


def hessian_traces(
    model: LoadedModel,
    calib: CalibData,
    *,
    probes: int = 4,
    batch_size: int = 32,
    max_batches: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """Hutchinson estimate of ``Tr(H)`` of :func:`calibration_loss` for every planned weight,
    keyed by parameter name (a tied weight once): ``probes`` Rademacher vectors on each of the
    first ``max_batches`` batches, Hessian-vector products by double backpropagation."""
    if probes < 1 or max_batches < 1:
        raise InputError(f"probes and max_batches must be >= 1, got {probes}, {max_batches}")
    params = {lay.param: get_weight(model.module, lay) for lay in model.layers}
    names, weights = list(params), list(params.values())
    was_trainable = [w.requires_grad for w in weights]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    totals = dict.fromkeys(names, 0.0)
    seen = 0
    try:
        for w in weights:
            w.requires_grad_(True)
        # The fused CPU attention kernels have no double backward; the math one is plain ops.
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            for (batch, labels), _ in zip(
                _labelled_batches(calib, batch_size, model.device), range(max_batches), strict=False
            ):
                loss = calibration_loss(model, batch, labels)
                grads = torch.autograd.grad(loss, weights, create_graph=True)
                for _ in range(probes):
                    vs = [
                        (torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(w) for w in weights
                    ]
                    hvs = torch.autograd.grad(grads, weights, grad_outputs=vs, retain_graph=True)
                    for name, v, hv in zip(names, vs, hvs, strict=True):
                        totals[name] += float((v * hv).sum())
                seen += probes
    finally:
        for w, flag in zip(weights, was_trainable, strict=True):
            w.requires_grad_(flag)
    return {name: total / seen for name, total in totals.items()}


def hawq_table(model: LoadedModel, traces: dict[str, float], formats: list[str]) -> pd.DataFrame:
    """HAWQ-V3 sensitivities ``Tr(H)/n · ‖Q(W) − W‖²`` as a table (layer, format, error).

    A negative trace estimate (a direction of negative curvature, or noise around zero) counts
    as zero. The members of a tie group after the first get error 0, so the shared tensor
    counts once when the problem sums a group's members.
    """
    rows = []
    counted: set[str] = set()
    for lay in model.layers:
        weight = weight_matrix(get_weight(model.module, lay).detach(), lay.kind).float()
        factor = 0.0 if lay.param in counted else max(traces[lay.param], 0.0) / lay.numel
        counted.add(lay.param)
        for name in formats:
            delta = fake_quantize(weight, parse_format(name)) - weight  # (rows, cols)
            rows.append(
                {
                    "layer": lay.name,
                    "format": name,
                    "error": factor * float(delta.double().square().sum()),
                }
            )
    return pd.DataFrame(rows)
