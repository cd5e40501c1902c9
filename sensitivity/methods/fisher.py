"""``fisher``: Fisher-weighted weight error ``½ Σ F ⊙ ΔW²`` from a few backward passes (DESIGN §6).

Why not the gradient of a distance to the full-precision outputs: at the full-precision point
that distance is at its minimum, so its gradient is exactly zero and the score would be all
zeros (every budget would get the same plan). We use the *true* Fisher instead, whose diagonal
is estimated from gradients of a pseudo-loss with zero-mean per-sample gradients:

- ``categorical`` (classifiers, causal LMs): labels are *sampled* from the model's own
  predictive distribution, ``y ~ softmax(logits)`` (logits ``[B, C]``, or ``[B, T, V]`` for a
  causal LM, whose position ``t`` predicts token ``t + 1`` and counts when both are real tokens,
  as in :mod:`bitplan.sensitivity.metrics`), loss = cross-entropy with those labels. This is the
  Fisher information of the predictive distribution (Martens, "New insights and perspectives
  on the natural gradient method", 2020, §5; Kirkpatrick et al., EWC, 2017).
- ``projection`` (embeddings, any tensor output): loss = ``⟨r, f(x)⟩`` with ``r ~ N(0, I)``;
  ``E[g gᵀ] = JᵀJ``, the Gauss–Newton matrix of the squared output error.

With a summed loss, the cross terms between predictions vanish in expectation, so
``F̂ = Σ_batches g² / n_predictions`` estimates the per-prediction Fisher diagonal.

Normalisation (chosen so the sum over layers is meaningful): no per-layer division. ``½ ΔWᵀ F
ΔW`` is the second-order increase of the expected loss, i.e. the expected KL divergence between
the full-precision and quantized predictive distributions in nats per prediction
(``categorical``), or half the mean squared output change per sample (``projection``). Scores of
different layers are on one scale and add up to a model-level estimate, as the additive
frontier assumes.

Memory: the model stays in its dtype and only the planned weights get gradients, each folded
in and freed as soon as backward has accumulated it, so the gradients of all planned weights
never exist at once. How a gradient is folded in depends on the model's size
(:mod:`._fisher_folds`): a small model keeps a Fisher sum per weight (float32 for float32
weights, bfloat16 for half ones: rounding of a few summed terms is far below the Monte Carlo
noise of one sampled label per prediction) and scores it after the last batch. Once those sums
would pass 256 MiB (a 128 M-parameter bfloat16 model) they would be a second checkpoint in RAM,
breaking issue 9's bound of 1.3 x checkpoint + 1 GB; then each batch's ``g²`` is folded
straight into one float per format, ``Σ g² ⊙ ΔW²`` in float32 chunks — the same sum in another
order, at the cost of one quantization of every planned weight per format and *batch* instead
of per format. Either way the method needs the checkpoint plus activations plus one gradient.
A tied tensor has one Fisher, so its score is split over its modules.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import QuantFormat
from bitplan.sensitivity.layers import QuantLayer, get_weight
from bitplan.sensitivity.methods._common import Scores, spread_over_ties, tie_groups
from bitplan.sensitivity.methods._fisher_folds import GradientFold, gradient_fold
from bitplan.sensitivity.metrics import counted_positions
from bitplan.sensitivity.progress import CancelFn, ProgressFn, check_cancel, report

if TYPE_CHECKING:
    from bitplan.sensitivity.rounder import Rounder

__all__ = ["FISHER_TARGETS", "FisherTarget", "fisher_errors"]

logger = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]
FisherTarget = Literal["categorical", "projection"]
FISHER_TARGETS = ("categorical", "projection")


def _pseudo_loss(
    out: torch.Tensor, target: FisherTarget, mask: torch.Tensor | None, gen: torch.Generator
) -> tuple[torch.Tensor, int]:
    """Summed pseudo-loss of one batch and the number of predictions it covers."""
    if target == "projection":
        r = torch.randn(out.shape, generator=gen, device=out.device, dtype=torch.float32)
        return (r * out.to(torch.float32)).sum(), out.shape[0]
    if out.dim() == 3:  # a causal LM: position t predicts token t + 1
        # Count the positions the metrics count: t and t + 1 both real tokens. Picked before
        # the float32 copy, so no float32 copy of the uncounted positions is ever made.
        counted = counted_positions(mask, out.shape[:2], out.device)  # (B, T-1)
        out = out[:, :-1][counted]  # (n_predictions, V)
    logits = out.to(torch.float32).reshape(-1, out.shape[-1])  # (n_predictions, V)
    with torch.no_grad():
        labels = torch.multinomial(logits.softmax(dim=-1), 1, generator=gen).squeeze(1)
    return F.cross_entropy(logits, labels, reduction="sum"), logits.shape[0]


def _accumulate(
    module: nn.Module,
    groups: list[list[QuantLayer]],
    fold: GradientFold,
    batches: Callable[[], Iterable[Batch]],
    output_fn: Callable[[Batch], torch.Tensor],
    target: FisherTarget,
    seed: int,
    on_batch: Callable[[], None],
    should_cancel: CancelFn | None,
) -> int:
    """Fold the squared pseudo-loss gradients of every tied tensor into ``fold``; returns the
    prediction count.

    Each gradient is folded in and freed as soon as backward has accumulated it, so the
    gradients of all planned weights never exist at once.
    """
    weights = {g[0].tensor_key: get_weight(module, g[0]) for g in groups}

    def make_hook(key: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if param.grad is not None:  # always set after accumulation; None adds nothing
                with torch.no_grad():
                    fold.fold(key, param.grad)
            param.grad = None

        return hook

    handles = [
        # torch leaves this method unannotated; it takes a (Tensor) -> None hook
        w.register_post_accumulate_grad_hook(make_hook(key))  # type: ignore[no-untyped-call]
        for key, w in weights.items()
    ]
    gen: torch.Generator | None = None
    n_predictions = 0
    try:
        for batch in batches():
            check_cancel(should_cancel)
            with torch.enable_grad():
                out = output_fn(batch)
                if not out.requires_grad:
                    raise RuntimeError(
                        "the model output has no autograd history; fisher needs "
                        "an output_fn that runs with gradients enabled"
                    )
                if gen is None:
                    gen = torch.Generator(device=out.device).manual_seed(seed)
                loss, n = _pseudo_loss(out, target, batch.get("attention_mask"), gen)
                torch.autograd.backward(loss)
            n_predictions += n
            on_batch()
    finally:
        for handle in handles:
            handle.remove()
    return n_predictions


def fisher_errors(
    module: nn.Module,
    layers: Sequence[QuantLayer],
    formats: Sequence[QuantFormat],
    *,
    batches: Callable[[], Iterable[Batch]],
    output_fn: Callable[[Batch], torch.Tensor],
    target: FisherTarget,
    seed: int = 0,
    n_batches: int | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    rounder: Rounder | None = None,
    max_sum_bytes: int | None = None,
) -> Scores:
    """Fisher-weighted error of every layer in every candidate format.

    ``output_fn(batch)`` returns the model output (logits for ``categorical``) with autograd
    history. Progress: stage ``"collect"`` per backward pass (when ``n_batches`` is known) and
    ``"analyze"`` per layer. Requires-grad flags and gradients are restored afterwards.

    Layers that no gradient reached (they do not influence ``output_fn``'s output: a pooler
    beside the hidden states, an unused head) are left out of the result: a Fisher of zero
    would call them free to quantize, so the caller scores them another way.

    ``max_sum_bytes``: above this size of per-weight Fisher sums (default
    :data:`~._fisher_folds.DEFAULT_MAX_SUM_BYTES`), each batch's gradients are folded straight
    into per-format errors instead (the same scores, less memory, more quantization; see the
    module docstring).
    """
    if target not in FISHER_TARGETS:
        raise ValueError(f"unknown fisher target {target!r}; accepted: {FISHER_TARGETS}")
    groups = tie_groups(layers)
    params = list(module.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    done = [0]

    def on_batch() -> None:
        done[0] += 1
        if n_batches is not None:
            report(progress, "collect", done[0], n_batches)

    if n_batches is not None:
        report(progress, "collect", 0, n_batches)  # the pass starts now: its cost is collect's
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for g in groups:
            get_weight(module, g[0]).requires_grad_(True)
        fold = gradient_fold(module, groups, formats, rounder, max_sum_bytes=max_sum_bytes)
        n_predictions = _accumulate(
            module, groups, fold, batches, output_fn, target, seed, on_batch, should_cancel
        )
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
    if n_predictions == 0:
        raise InputError(
            "no predictions to weigh: the calibration data is empty (or every "
            "text is a single token); fisher needs at least one"
        )

    scores: Scores = {}
    for g in groups:
        check_cancel(should_cancel)
        totals = fold.totals(g)
        if totals is None:  # an unused head or pooler: no score (not 0) rather than a free int2
            logger.info("no gradient reached %s; left for another method", g[0].name)
            continue
        # ½ ΔWᵀ F ΔW, F per prediction: the expected loss (KL) increase, see module doc.
        errors = {name: 0.5 * total / n_predictions for name, total in totals.items()}
        spread_over_ties(g, errors, scores)
        report(progress, "analyze", len(scores), len(layers))
    return scores
