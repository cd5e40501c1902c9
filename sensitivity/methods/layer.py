"""``layer``: relative layer-output error ``‖ΔW·X‖² / ‖W·X‖²`` on calibration inputs (DESIGN §6).

Forward pre-hooks accumulate every planned layer's input Gram matrix ``H = X·Xᵀ`` during one pass
over the calibration data (see :mod:`bitplan.sensitivity.methods._gram`); then every format is
scored as ``tr(ΔW·H·ΔWᵀ) / tr(W·H·Wᵀ)`` with no further forwards, and each ``H`` is freed as soon as
its layer is scored. The ratio is scale-free, so layers of different sizes compare on one scale.

Memory: ``H`` is float32 ``[cols, cols]`` (480 MB for ``cols = 11008``). When the statistics of
all layers together would exceed ``max_stats_bytes`` the layers are split into consecutive
passes, each a full forward over the data; a small model takes one pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bitplan.sensitivity.formats import CodesFn, QuantFormat
from bitplan.sensitivity.half_products import run_module
from bitplan.sensitivity.layers import QuantLayer
from bitplan.sensitivity.methods._common import (
    Scores,
    candidates,
    iter_deltas,
    layer_matrix,
    quantizer_of,
)
from bitplan.sensitivity.methods._gram import InputStats, stats_bytes
from bitplan.sensitivity.progress import CancelFn, ProgressFn, check_cancel, report

if TYPE_CHECKING:
    from bitplan.sensitivity.rounder import Rounder

__all__ = [
    "DEFAULT_STATS_BYTES",
    "collect_input_stats",
    "layer_errors",
    "plan_passes",
    "score_layer",
]

logger = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]

# Statistics held at once by default: 4 GiB holds the Gram matrices of several decoder blocks
# of a 7B model (≈0.9 GiB each), so such a model needs ≈8 passes while anything small needs 1.
DEFAULT_STATS_BYTES = 4 << 30


def plan_passes(
    module: nn.Module, layers: Sequence[QuantLayer], budget: int
) -> list[list[QuantLayer]]:
    """Consecutive runs of layers whose statistics fit ``budget`` (a larger one runs alone)."""
    passes: list[list[QuantLayer]] = [[]]
    used = 0
    for lay in layers:
        size = stats_bytes(module.get_submodule(lay.name), lay)
        if passes[-1] and used + size > budget:
            passes.append([])
            used = 0
        passes[-1].append(lay)
        used += size
    return passes


def _attention_mask(batch: Any) -> torch.Tensor | None:
    mask: torch.Tensor | None = batch.get("attention_mask")
    return mask


def collect_input_stats(
    module: nn.Module,
    layers: Sequence[QuantLayer],
    batches: Callable[[], Iterable[Any]],
    forward: Callable[[Any], Any],
    on_batch: Callable[[], None],
    should_cancel: CancelFn | None,
    *,
    mask_of: Callable[[Any], torch.Tensor | None] = _attention_mask,
) -> dict[str, InputStats]:
    """One forward pass over the data with hooks on ``layers``; returns their statistics.

    A batch is whatever ``forward`` takes (by default an input dict); ``mask_of(batch)`` is its
    attention mask (padding tokens are left out of the statistics), by default
    ``batch.get("attention_mask")``."""
    stats: dict[str, InputStats] = {}
    current_mask: list[torch.Tensor | None] = [None]
    handles = []

    def make_hook(st: InputStats) -> Callable[..., None]:
        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            st.add(args[0] if args else kwargs["input"], current_mask[0])

        return hook

    for lay in layers:
        sub = module.get_submodule(lay.name)
        st = stats[lay.name] = InputStats(sub, lay, layer_matrix(module, lay).device)
        handles.append(sub.register_forward_pre_hook(make_hook(st), with_kwargs=True))
    try:
        with torch.no_grad():
            for batch in batches():
                check_cancel(should_cancel)
                current_mask[0] = mask_of(batch)
                forward(batch)
                on_batch()
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _score(
    matrix: torch.Tensor, st: InputStats, formats: Sequence[QuantFormat], codes: CodesFn | None
) -> tuple[dict[str, float], bool]:
    """``tr(ΔW·H·ΔWᵀ) / tr(W·H·Wᵀ)`` per format (the denominator is computed once), and whether
    that denominator is positive: when it is 0 the layer's output carried no signal to compare
    against, and every error reads 0."""
    errors: dict[str, float] = {}
    den: float | None = None
    for fmt in formats:
        num = total = 0.0
        for start, stop, w, dw in iter_deltas(matrix, fmt, block=st.block, codes=codes):
            num += st.energy(start, stop, dw)
            if den is None:
                total += st.energy(start, stop, w)
        den = total if den is None else den
        errors[fmt.name] = num / den if den > 0 else 0.0
    return errors, den is not None and den > 0


def _seen(st: InputStats) -> str:
    """What an unmeasured layer saw, for a log line."""
    return "only zero inputs" if st.samples else "no calibration input (it never ran)"


def score_layer(
    matrix: torch.Tensor,
    st: InputStats,
    formats: Sequence[QuantFormat],
    *,
    rounder: Rounder | None,
    skip_unmeasured: bool = False,
) -> dict[str, float] | None:
    """``st.layer``'s relative output error in each of its candidate formats, from its
    ``[rows, cols]`` weight ``matrix``; None for a layer whose output carried no signal when
    ``skip_unmeasured`` (see :func:`layer_errors`)."""
    lay = st.layer
    errors, measured = _score(matrix, st, candidates(lay, formats), quantizer_of(rounder, lay))
    if measured:
        return errors
    if skip_unmeasured:
        logger.info("layer %s saw %s; left for another method", lay.name, _seen(st))
        return None
    logger.warning("layer %s saw %s; its output error is scored 0", lay.name, _seen(st))
    return errors


def layer_errors(
    module: nn.Module,
    layers: Sequence[QuantLayer],
    formats: Sequence[QuantFormat],
    *,
    batches: Callable[[], Iterable[Batch]],
    forward: Callable[[Batch], Any] | None = None,
    n_batches: int | None = None,
    max_stats_bytes: int = DEFAULT_STATS_BYTES,
    skip_unmeasured: bool = False,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    rounder: Rounder | None = None,
) -> Scores:
    """Relative output error of every layer in every candidate format (formats with a rounding
    other than rtn are rounded by ``rounder``).

    ``batches()`` returns a fresh iterable of input dicts on the module's device each call;
    ``forward(batch)`` runs the model (default ``module(**batch)``). Progress: stage
    ``"collect"`` per batch (when ``n_batches`` is known) and ``"analyze"`` per layer.

    A layer whose output carried no signal (it never ran on the data, or saw only zeros, so
    ``tr(W·H·Wᵀ) = 0``) has no relative error: it is scored 0 with a warning, or, with
    ``skip_unmeasured``, left out of the result for a caller that scores it another way (and
    tells the user how, so that no warning here contradicts it).
    """
    forward = forward or (lambda batch: run_module(module, batch))
    passes = plan_passes(module, layers, max_stats_bytes)
    if len(passes) > 1:
        logger.info(
            "layer statistics exceed %d bytes: %d forward passes", max_stats_bytes, len(passes)
        )
    collected = [0]
    total_batches = (n_batches or 0) * len(passes)

    def on_batch() -> None:
        collected[0] += 1
        if n_batches is not None:
            report(progress, "collect", collected[0], total_batches)

    scores: Scores = {}
    done = 0
    if n_batches is not None:
        report(progress, "collect", 0, total_batches)  # the pass starts now: its cost is collect's
    for group in passes:
        stats = collect_input_stats(module, group, batches, forward, on_batch, should_cancel)
        for lay in group:
            check_cancel(should_cancel)
            st = stats.pop(lay.name)  # dropped from the dict: H is freed once scored
            errors = score_layer(
                layer_matrix(module, lay),
                st,
                formats,
                rounder=rounder,
                skip_unmeasured=skip_unmeasured,
            )
            if errors is not None:
                scores[lay.name] = errors
            done += 1
            report(progress, "analyze", done, len(layers))
    return scores
