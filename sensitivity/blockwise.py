"""Block-wise ``layer`` sensitivity: a decoder LM analysed one transformer block at a time.

The ``layer`` method needs, for every planned linear, the Gram matrix ``H = X·Xᵀ`` of its
inputs on the calibration data (:mod:`bitplan.sensitivity.methods.layer`). A decoder LM computes
those inputs block by block, so the model never has to be whole in memory: one pass of
:mod:`bitplan.sensitivity.blockwise_walk` (the model's skeleton, the embeddings run up to
block 0 whose inputs are cached, then each block's weights read, run on the cached activations
and dropped, the final norm and the head last) collects each stage's statistics while its
weights are in memory:

- :func:`blockwise_layer_errors` scores the stage's planned layers there (embeddings from the
  front, each block's linears, the head from the tail; the head's output, the logits, is never
  computed);
- :func:`blockwise_rounder` writes the stage's Gram matrices to disk, the statistics files
  :func:`~bitplan.sensitivity.rounder.collect_rounder` writes for a whole model, so data-aware
  roundings (GPTQ, AWQ) of a block-wise search round exactly as a whole-model one does.

The numbers are the ones the ``layer`` method gives the whole model: the same operations run on
the same tensors in the same order (tests check equality). A weight tied between the embedding
and the head is scored last, from its tensor read again, once the statistics of all its uses
are in (data-aware roundings of a tied tensor see all of them, as on the whole model).

Memory: the largest of one block's weights, the embeddings or the head, plus the block's input
statistics (``4·cols²`` bytes a linear, as in ``layer``), plus the cached activations (see
:mod:`~bitplan.sensitivity.blockwise_walk`). End-to-end figures (a plan's output error) are
measured by a streamed pass of the same kind, :mod:`bitplan.search.blockwise_eval`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitplan.sensitivity.blockwise_walk import (
    BLOCKWISE_TYPES,
    Batch,
    Layout,
    Stages,
    block_forward,
    catching,
    decoder_layout,
    mask_of,
    tail_forward,
)
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import QuantFormat
from bitplan.sensitivity.layers import QuantLayer, weight_matrix
from bitplan.sensitivity.lazy_hf import SkeletonModel, slots_under
from bitplan.sensitivity.methods._common import Scores, layer_matrix
from bitplan.sensitivity.methods._gram import InputStats, gram_matrices
from bitplan.sensitivity.methods.layer import collect_input_stats, score_layer
from bitplan.sensitivity.progress import CancelFn, ProgressFn, report
from bitplan.sensitivity.rounder import Rounder, needs_data, write_stats

__all__ = [
    "BLOCKWISE_TYPES",
    "blockwise_layer_errors",
    "blockwise_rounder",
    "check_blockwise_method",
]

logger = logging.getLogger(__name__)

# What a stage hands on: its planned layers and their statistics, while its weights are loaded.
StageFn = Callable[[list[QuantLayer], dict[str, InputStats]], None]


def check_blockwise_method(method: str) -> None:
    """Block-wise analysis computes the ``layer`` method only; any other is an error."""
    if method != "layer":
        raise InputError(
            f"block-wise analysis computes the layer method only, not {method!r}: pass "
            "method layer (fisher and e2e need the whole model's forward and backward)"
        )


@dataclass
class _Run:
    """What every stage shares: the skeleton, the options and the progress counts."""

    model: SkeletonModel
    formats: Sequence[QuantFormat]
    rounder: Rounder | None
    progress: ProgressFn | None
    should_cancel: CancelFn | None
    n_layers: int
    collect_total: int
    collected: int = 0
    scored: int = 0

    def on_batch(self) -> None:
        self.collected += 1
        if self.collect_total:
            report(self.progress, "collect", self.collected, self.collect_total)

    def stats(
        self,
        layers: Sequence[QuantLayer],
        items: Callable[[], Iterable[Any]],
        forward: Callable[[Any], Any],
    ) -> dict[str, InputStats]:
        """The statistics of ``layers`` over one pass of ``forward`` over ``items()``."""
        return collect_input_stats(
            self.model.module,
            layers,
            items,
            forward,
            self.on_batch,
            self.should_cancel,
            mask_of=mask_of,
        )

    def rounder_for(
        self, layers: Sequence[QuantLayer], stats: Mapping[str, InputStats]
    ) -> Rounder | None:
        """The caller's rounder, else one from these layers' statistics when a format needs
        data (a data-aware rounding of a layer uses exactly its own ``H``), else None."""
        if self.rounder is not None and self.rounder.has_data:
            return self.rounder
        return Rounder(gram_matrices(layers, stats)) if needs_data(self.formats) else None

    def score(
        self,
        layers: Sequence[QuantLayer],
        stats: Mapping[str, InputStats],
        matrix: Callable[[QuantLayer], torch.Tensor],
        scores: Scores,
    ) -> None:
        rounder = self.rounder_for(layers, stats)
        for lay in layers:
            errors = score_layer(matrix(lay), stats[lay.name], self.formats, rounder=rounder)
            if errors is not None:
                scores[lay.name] = errors
            self.scored += 1
            report(self.progress, "analyze", self.scored, self.n_layers)


@contextmanager
def _hooks_only(module: nn.Module) -> Iterator[None]:
    """Calls of ``module`` run its forward pre-hooks (which collect the statistics) but not its
    forward: the head's output, ``samples × tokens × vocabulary`` logits, is never needed."""

    def no_output(*_args: Any, **_kwargs: Any) -> None:
        return None

    module.forward = no_output  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del module.forward


def _walk(
    run: _Run, layout: Layout, batches: Callable[[], Iterable[Batch]], on_stage: StageFn
) -> None:
    """One block-by-block pass over ``batches()``: each stage's planned layers and their
    statistics go to ``on_stage`` while the stage's weights are loaded."""
    model = run.model
    module, device = model.module, model.device
    ckpt = model.checkpoint
    if ckpt is None:
        raise TypeError("block-wise analysis needs a skeleton from load_skeleton")
    stages = Stages.of(module, layout)
    by_stage = stages.split(model.layers)
    with ckpt.loaded(module, stages.front, device):
        with catching(model, layout) as (cached, forward):
            stats = run.stats(by_stage[0], batches, forward)
        on_stage(by_stage[0], stats)
    logger.info(
        "block-wise: %d batches cached at the input of %d blocks", len(cached), len(stages.blocks)
    )
    for i, prefix in enumerate(stages.blocks, start=1):
        with ckpt.loaded(module, slots_under(module, prefix), device):
            stats = run.stats(
                by_stage[i], lambda: cached, block_forward(module.get_submodule(prefix))
            )
            on_stage(by_stage[i], stats)
        del stats
    with ckpt.loaded(module, stages.tail_slots(module), device):
        with _hooks_only(module.get_submodule(layout.head)):
            stats = run.stats(by_stage[-1], lambda: cached, tail_forward(module, layout))
        on_stage(by_stage[-1], stats)
    cached.clear()  # the activations go before a tied weight is read again


def blockwise_layer_errors(
    model: SkeletonModel,
    formats: Sequence[QuantFormat],
    *,
    batches: Callable[[], Iterable[Batch]],
    n_batches: int | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    rounder: Rounder | None = None,
) -> Scores:
    """The ``layer`` method's scores of ``model.layers`` (see
    :func:`~bitplan.sensitivity.methods.layer.layer_errors`), computed block by block as the
    module docstring describes. ``batches()`` yields input dicts on ``model.device``.

    Progress: ``"collect"`` per batch of each stage (embeddings, every block, head) and
    ``"analyze"`` per layer. Formats with a data-aware rounding are rounded by ``rounder``
    when it has statistics, else from the statistics collected here.
    """
    if model.checkpoint is None:
        raise TypeError("blockwise_layer_errors needs a skeleton from load_skeleton")
    layout = decoder_layout(model)
    module, ckpt, device = model.module, model.checkpoint, model.device
    run = _Run(
        model=model,
        formats=formats,
        rounder=rounder,
        progress=progress,
        should_cancel=should_cancel,
        n_layers=len(model.layers),
        collect_total=(n_batches or 0) * (len(Stages.of(module, layout).blocks) + 2),
    )
    scores: Scores = {}
    tied: list[QuantLayer] = []  # scored last, from all their uses' statistics
    tied_stats: dict[str, InputStats] = {}

    def score(layers: list[QuantLayer], stats: dict[str, InputStats]) -> None:
        own = [lay for lay in layers if lay.tie is None]
        run.score(own, stats, lambda lay: layer_matrix(module, lay), scores)
        for lay in layers:
            if lay.tie is not None:
                tied.append(lay)
                tied_stats[lay.name] = stats[lay.name]

    _walk(run, layout, batches, score)
    run.score(
        tied,
        tied_stats,
        lambda lay: weight_matrix(ckpt.tensor(lay.param, device), lay.kind),
        scores,
    )
    return scores


def blockwise_rounder(
    model: SkeletonModel,
    *,
    batches: Callable[[], Iterable[Batch]],
    workdir: Path,
    should_cancel: CancelFn | None = None,
) -> Rounder:
    """A :class:`Rounder` with every planned layer's input Gram matrix, from one block-by-block
    pass over ``batches()``: one statistics file a stage under ``workdir`` (tied tensors' in a
    last one, their uses summed), read back through memory maps, as
    :func:`~bitplan.sensitivity.rounder.collect_rounder` leaves them for a whole model."""
    layout = decoder_layout(model)
    run = _Run(
        model=model,
        formats=(),
        rounder=None,
        progress=None,
        should_cancel=should_cancel,
        n_layers=len(model.layers),
        collect_total=0,
    )
    files: list[Path] = []
    tied: list[QuantLayer] = []
    tied_grams: dict[str, torch.Tensor] = {}

    def keep(layers: list[QuantLayer], stats: dict[str, InputStats]) -> None:
        own = [lay for lay in layers if lay.tie is None]
        grams = gram_matrices(own, stats)
        if grams:
            files.append(write_stats(workdir, len(files), own, grams))
        shared = [lay for lay in layers if lay.tie is not None]
        tied.extend(shared)
        for param, gram in gram_matrices(shared, stats).items():
            have = tied_grams.get(param)
            tied_grams[param] = gram if have is None else have + gram

    _walk(run, layout, batches, keep)
    if tied_grams:
        files.append(write_stats(workdir, len(files), tied, tied_grams))
    logger.info(
        "block-wise input statistics of %d layers for data-aware rounding", len(model.layers)
    )
    return Rounder.load(files)
