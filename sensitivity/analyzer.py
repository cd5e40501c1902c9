"""Sensitivity analysis of a loaded model: ``error[layer, format]`` by one of four methods.

:func:`analyze` adapts a :class:`~bitplan.sensitivity.models.LoadedModel` and its
:class:`~bitplan.sensitivity.data.CalibData` to the method functions of
:mod:`bitplan.sensitivity.methods` (which work on plain modules), builds the table of
:mod:`bitplan.sensitivity.table` and caches it by content, so a second job on the same model, data,
method and formats re-solves a new budget without touching the model. Methods (DESIGN §6; names are
part of the CLI and REST contract):

- ``weight``: data-free relative weight error ``‖ΔW‖² / ‖W‖²``;
- ``layer``: relative layer-output error ``‖ΔW·X‖² / ‖W·X‖²`` from one forward pass;
- ``fisher``: ``½ Σ F ⊙ ΔW²`` with the true Fisher, from one backward pass per batch;
- ``e2e``: the model-level metric with one layer quantized, one evaluation per (layer, format).

Every method runs on ``model.device`` in the model's dtype and touches one layer's weights at a
time. A model loaded as a skeleton (:func:`~bitplan.sensitivity.lazy_hf.load_skeleton`, for one
that does not fit) is analysed block by block (:mod:`bitplan.sensitivity.blockwise`), by
``layer`` only. A user-supplied table is read with :func:`read_table` instead.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from bitplan.sensitivity.blockwise import blockwise_layer_errors, check_blockwise_method
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import QuantFormat, parse_formats
from bitplan.sensitivity.layers import QuantLayer
from bitplan.sensitivity.lazy_hf import SkeletonModel
from bitplan.sensitivity.method_names import METHODS
from bitplan.sensitivity.methods import (
    Scores,
    e2e_errors,
    fisher_errors,
    layer_errors,
    weight_errors,
)
from bitplan.sensitivity.methods.rounded import (
    needs_rescaling,
    rescale_rounded,
    scored_formats,
)
from bitplan.sensitivity.metrics import collect_reference, forward_output, measure, output_kind
from bitplan.sensitivity.progress import CancelFn, ProgressFn, report
from bitplan.sensitivity.rounder import Rounder, collect_rounder, needs_data
from bitplan.sensitivity.table import (
    build_table,
    cache_key,
    load_cached,
    read_table,
    store_cached,
    write_table,
)

if TYPE_CHECKING:
    from bitplan.sensitivity.data import CalibData
    from bitplan.sensitivity.models import LoadedModel

__all__ = ["METHODS", "analyze", "read_table", "rounder_for", "table_key", "write_table"]

logger = logging.getLogger(__name__)


def _formats(formats: Sequence[QuantFormat | str]) -> list[QuantFormat]:
    if not formats:
        raise InputError("no formats to analyze; give at least one, e.g. int8,int4-g128")
    return parse_formats(formats)  # rejects duplicates


# fisher backpropagates through this share of the calibration batches: a backward pass costs
# about two forwards, and the diagonal Fisher's ranking settles long before the data runs out
# (Spearman vs e2e 0.997 on builtin:tiny-lm both ways), which keeps the method near 3 forward-
# equivalents (benchmarks/RESULTS.md).
_FISHER_FRACTION = 0.5


def _fisher_batches(n_batches: int) -> int:
    return max(1, math.ceil(n_batches * _FISHER_FRACTION))


def _settings(method: str, *, batch_size: int, seed: int) -> dict[str, int | float]:
    """Options that change a method's numbers (and so its cache key)."""
    # fisher draws labels / projections per batch, so its numbers depend on both.
    if method == "fisher":
        return {"batch_size": batch_size, "seed": seed, "fraction": _FISHER_FRACTION}
    return {}


def _measure_scores(
    model: LoadedModel,
    calib: CalibData,
    method: str,
    formats: list[QuantFormat],
    *,
    batch_size: int,
    seed: int,
    progress: ProgressFn | None,
    should_cancel: CancelFn | None,
    rounder: Rounder | None,
) -> tuple[Scores, dict[str, str]]:
    """Scores of every layer and ``{layer: method}`` for layers another method had to score.

    fisher cannot score a layer that no gradient reaches (a pooler beside the hidden states
    the metrics compare, an unused head): its Fisher is 0, which would make it free to drop to
    the smallest format. Such layers are scored by ``layer`` (their own output error), or by
    ``weight`` when their output carried no signal on the calibration data (they never ran).
    """
    module, layers = model.module, model.layers
    if method == "weight":
        scores = weight_errors(
            module, layers, formats, progress=progress, should_cancel=should_cancel, rounder=rounder
        )
        return scores, {}
    if len(calib) == 0:
        raise InputError(f"the calibration data is empty; method {method} needs samples")

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        return calib.batches(batch_size, device=model.device)

    n_batches = math.ceil(len(calib) / batch_size)
    if method == "layer":
        scores = layer_errors(
            module,
            layers,
            formats,
            batches=batches,
            n_batches=n_batches,
            progress=progress,
            should_cancel=should_cancel,
            rounder=rounder,
        )
        return scores, {}
    if method == "fisher":
        kind = output_kind(model.task)
        n_fisher = _fisher_batches(n_batches)
        scores = fisher_errors(
            module,
            layers,
            formats,
            batches=lambda: itertools.islice(batches(), n_fisher),
            output_fn=lambda batch: forward_output(model, batch),
            target="categorical" if kind in ("classification", "lm") else "projection",
            seed=seed,
            n_batches=n_fisher,
            progress=progress,
            should_cancel=should_cancel,
            rounder=rounder,
        )
        unreached = [lay for lay in layers if lay.name not in scores]
        if not unreached:
            return scores, {}
        return scores, _score_unreached(
            module,
            unreached,
            formats,
            scores,
            batches=batches,
            should_cancel=should_cancel,
            rounder=rounder,
        )
    reference = collect_reference(model, calib, batch_size=batch_size)
    scores = e2e_errors(
        module,
        layers,
        formats,
        evaluate=lambda: measure(model, calib, reference)["error"],
        progress=progress,
        should_cancel=should_cancel,
        rounder=rounder,
    )
    return scores, {}


def _measure_with_roundings(
    model: LoadedModel,
    calib: CalibData,
    method: str,
    formats: list[QuantFormat],
    *,
    batch_size: int,
    seed: int,
    progress: ProgressFn | None,
    should_cancel: CancelFn | None,
    rounder: Rounder | None,
) -> tuple[Scores, dict[str, str]]:
    """:func:`_measure_scores`, except that ``weight`` and ``fisher`` score rounded options
    through the ``layer`` method's ratio to round-to-nearest (see
    :mod:`bitplan.sensitivity.methods.rounded` for why their own scores mislead there)."""
    measure_with = functools.partial(
        _measure_scores,
        model,
        calib,
        method,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        should_cancel=should_cancel,
        rounder=rounder,
    )
    if not needs_rescaling(method, formats) or len(calib) == 0:
        return measure_with(formats)
    direct, ratio_formats = scored_formats(formats)
    scores, scored_by = measure_with(direct)
    by_layer = layer_errors(
        model.module,
        model.layers,
        ratio_formats,
        batches=lambda: calib.batches(batch_size, device=model.device),
        skip_unmeasured=True,
        should_cancel=should_cancel,
        rounder=rounder,
    )
    scores = rescale_rounded(scores, by_layer, formats)
    wanted = {f.name for f in formats}
    return {k: {f: e for f, e in v.items() if f in wanted} for k, v in scores.items()}, scored_by


# Why each fallback scored a layer that fisher could not, as the user reads it.
_FALLBACK_REASON = {
    "layer": "scored by its own output error instead",
    "weight": "and no calibration input reached it either (it never ran, or saw only zeros): "
    "scored by its weight error instead",
}


def _score_unreached(
    module: torch.nn.Module,
    unreached: Sequence[QuantLayer],
    formats: Sequence[QuantFormat],
    scores: Scores,
    *,
    batches: Callable[[], Iterator[dict[str, torch.Tensor]]],
    should_cancel: CancelFn | None,
    rounder: Rounder | None,
) -> dict[str, str]:
    """Score the layers no fisher gradient reached by ``layer``, or by ``weight`` for those
    whose output carried no signal on the data; add them to ``scores``, warn once per layer
    and return ``{layer: method used}``."""
    scored_by = dict.fromkeys((lay.name for lay in unreached), "weight")
    by_layer = layer_errors(
        module,
        unreached,
        formats,
        batches=batches,
        skip_unmeasured=True,
        should_cancel=should_cancel,
        rounder=rounder,
    )
    scores.update(by_layer)
    scored_by.update(dict.fromkeys(by_layer, "layer"))
    by_weight = [lay for lay in unreached if lay.name not in by_layer]
    if by_weight:
        scores.update(
            weight_errors(module, by_weight, formats, should_cancel=should_cancel, rounder=rounder)
        )
    for name, how in scored_by.items():
        logger.warning(
            "fisher: no gradient reached %s (it does not change the output bitplan measures); "
            "%s (method %r in the table), on that method's relative scale, which keeps it at "
            "high precision",
            name,
            _FALLBACK_REASON[how],
            how,
        )
    return scored_by


def _blockwise_scores(
    model: SkeletonModel,
    calib: CalibData,
    formats: list[QuantFormat],
    batch_size: int,
    progress: ProgressFn | None,
    should_cancel: CancelFn | None,
    rounder: Rounder | None,
) -> Scores:
    """The ``layer`` method's scores of a skeleton model, block by block."""
    if len(calib) == 0:
        raise InputError("the calibration data is empty; method layer needs samples")
    return blockwise_layer_errors(
        model,
        formats,
        batches=lambda: calib.batches(batch_size, device=model.device),
        n_batches=math.ceil(len(calib) / batch_size),
        progress=progress,
        should_cancel=should_cancel,
        rounder=rounder,
    )


def _subset(planned: Sequence[QuantLayer], chosen: Sequence[QuantLayer]) -> list[QuantLayer]:
    """The layers of ``planned`` named in ``chosen``, in ``planned``'s order (the table's).

    A tie group is one tensor: its score is split over all of its modules, so a subset that
    holds part of one would score it differently from the whole model's table."""
    names = {lay.name for lay in chosen}
    if not names:
        raise InputError("nothing to analyze: the subset of layers is empty")
    unknown = sorted(names - {lay.name for lay in planned})
    if unknown:
        raise InputError(f"cannot analyze {', '.join(unknown[:3])}: not a planned layer")
    subset = [lay for lay in planned if lay.name in names]
    keys = {lay.tensor_key for lay in subset}
    cut = sorted(lay.name for lay in planned if lay.tensor_key in keys and lay.name not in names)
    if cut:
        raise InputError(f"a subset of layers holds whole tie groups; it lacks {', '.join(cut)}")
    return subset


def table_key(
    model: LoadedModel,
    calib: CalibData,
    *,
    method: str,
    formats: Sequence[QuantFormat | str],
    batch_size: int,
    seed: int,
) -> str:
    """The cache key of ``model.layers``' table: what :func:`analyze` stores it under, so a
    table put together another way (from shards) is cached and found like its own."""
    fmts = _formats(formats)
    return cache_key(
        model_sha256=model.sha256,
        calib_sha256=None if method == "weight" and not needs_data(fmts) else calib.sha256,
        method=method,
        formats=fmts,
        layers=model.layers,
        settings=_settings(method, batch_size=batch_size, seed=seed),
    )


def rounder_for(
    model: LoadedModel,
    calib: CalibData,
    *,
    batch_size: int,
    workdir: Path,
    should_cancel: CancelFn | None = None,
) -> Rounder:
    """A :class:`Rounder` with ``model``'s planned layers' input statistics on ``calib``."""
    if len(calib) == 0:
        raise InputError("the calibration data is empty; data-aware rounding needs samples")
    return collect_rounder(
        model.module,
        model.layers,
        batches=lambda: calib.batches(batch_size, device=model.device),
        forward=lambda batch: forward_output(model, batch),
        workdir=workdir,
        should_cancel=should_cancel,
    )


def analyze(
    model: LoadedModel,
    calib: CalibData,
    *,
    method: str,
    formats: Sequence[QuantFormat | str],
    batch_size: int = 16,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    seed: int = 0,
    rounder: Rounder | None = None,
    layers: Sequence[QuantLayer] | None = None,
) -> pd.DataFrame:
    """The sensitivity table of ``model.layers`` in ``formats`` (pinned layers: their format).

    Returns a DataFrame with columns ``layer, param, format, error, numel, bytes, tie,
    method`` (``method``: what scored the row; ``fisher`` falls back to ``layer`` or
    ``weight`` for layers no gradient reaches, and says so in a warning). With
    ``cache_dir`` the table is looked up first and stored after (``<cache_dir>/sensitivity``).
    ``seed`` seeds the fisher method's sampling. Formats with a data-aware rounding
    (``int4-g128+gptq``) are rounded by ``rounder``; without one, one is collected here (a forward
    pass over ``calib``) and dropped afterwards. Progress: stage ``"analyze"`` per layer, and
    ``"collect"`` per batch of the data pass of ``layer`` and ``fisher``; ``should_cancel`` is
    polled between layers and batches.

    A :class:`~bitplan.sensitivity.lazy_hf.SkeletonModel` is analysed block by block (method
    ``layer`` only, rounding statistics collected on the way): the same table as the whole
    model's, with one block's weights in memory at a time (a cached table is shared).

    ``layers`` scores only those of ``model.layers`` (whole tie groups): the rows of exactly
    those layers as the whole model's table has them, at the cost of the method's full data
    passes, so that several processes can split one table (app/sensitivity_shards.py). fisher
    still runs every backward pass but gives gradients, and scores, to these layers only.
    """
    if layers is not None:
        model = dataclasses.replace(model, layers=_subset(model.layers, layers))
    if method not in METHODS:
        raise InputError(f"unknown sensitivity method {method!r}; accepted: {', '.join(METHODS)}")
    if isinstance(model, SkeletonModel):
        check_blockwise_method(method)
    if batch_size < 1:
        raise InputError(f"batch size must be a positive integer, got {batch_size}")
    fmts = _formats(formats)
    if not model.layers:
        raise InputError("nothing to analyze: every quantizable layer is excluded")
    key = table_key(model, calib, method=method, formats=fmts, batch_size=batch_size, seed=seed)
    if cache_dir is not None:
        cached = load_cached(cache_dir, key)
        if cached is not None:
            logger.info("sensitivity table (%s) from cache, key %s", method, key[:12])
            report(progress, "analyze", len(model.layers), len(model.layers))
            return cached
    logger.info(
        "analyzing %d layers x %d formats with method %s on %s",
        len(model.layers),
        len(fmts),
        method,
        model.device,
    )
    if isinstance(model, SkeletonModel):
        scores = _blockwise_scores(model, calib, fmts, batch_size, progress, should_cancel, rounder)
        scored_by: dict[str, str] = {}
    else:
        with ExitStack() as stack:
            if needs_data(fmts) and (rounder is None or not rounder.has_data):
                rounder = rounder_for(
                    model,
                    calib,
                    batch_size=batch_size,
                    workdir=Path(stack.enter_context(tempfile.TemporaryDirectory())),
                    should_cancel=should_cancel,
                )
            scores, scored_by = _measure_with_roundings(
                model,
                calib,
                method,
                fmts,
                batch_size=batch_size,
                seed=seed,
                progress=progress,
                should_cancel=should_cancel,
                rounder=rounder,
            )
    table = build_table(model.layers, scores, method=method, scored_by=scored_by)
    if cache_dir is not None:
        store_cached(cache_dir, key, table)
    return table
