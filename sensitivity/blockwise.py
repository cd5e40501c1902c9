"""Block-wise ``layer`` sensitivity: a decoder LM analysed one transformer block at a time.

The ``layer`` method needs, for every planned linear, the Gram matrix ``H = X·Xᵀ`` of its
inputs on the calibration data (:mod:`bitplan.sensitivity.methods.layer`). A decoder LM computes
those inputs block by block, and block ``i + 1`` sees only what block ``i`` returned, so the
model never has to be whole in memory: the way GPTQ-style tools quantize LLMs sequentially
(Frantar et al. 2022, §4 "Step 3"; AutoGPTQ and llm-compressor's sequential pipelines).

1. The model is a skeleton (:mod:`bitplan.sensitivity.lazy_hf`): no weights. The parameters in
   front of the blocks (token and position embeddings) are read from the safetensors files and
   the model runs on each calibration batch until block 0 is called; a hook there records the
   block's inputs (hidden states, attention mask, position embeddings, …) and stops the forward
   (the "catcher" of GPTQ tools). Embedding layers are scored from that pass.
2. For each block: read its weights, run it on every cached input with the Gram hooks of its
   planned layers, score them, keep its outputs (in the checkpoint dtype, unquantized) as the
   next block's inputs, and drop its weights.
3. The final norm and the LM head run on the last block's outputs; the head is scored.

The numbers are the ones the ``layer`` method gives the whole model: the same operations run on
the same tensors in the same order (tests check equality). A weight tied between the embedding
and the head is scored last, from its tensor read again, once the statistics of all its uses
are in (data-aware roundings of a tied tensor see all of them, as on the whole model).

Memory: the largest of one block's weights, the embeddings or the head, plus the block's input
statistics (``4·cols²`` bytes a linear, as in ``layer``), plus the cached activations: two
copies (a block's inputs and outputs) of ``samples × tokens × hidden × dtype bytes``, e.g.
128 samples of 2048 tokens at hidden size 8192 in bf16 are 4 GiB each, beside what the model
passes every block (the attention mask and the rotary cos/sin of each batch). They stay on the
analysis device. What it does not measure: anything end-to-end (the model's output error with a
plan applied); that needs the whole model, where it fits or on a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import QuantFormat
from bitplan.sensitivity.layers import QuantLayer, weight_matrix
from bitplan.sensitivity.lazy_hf import SkeletonModel, slots_under
from bitplan.sensitivity.methods._common import Scores, layer_matrix
from bitplan.sensitivity.methods._gram import InputStats, gram_matrices
from bitplan.sensitivity.methods.layer import collect_input_stats, score_layer
from bitplan.sensitivity.progress import CancelFn, ProgressFn, report
from bitplan.sensitivity.rounder import Rounder, needs_data

__all__ = ["BLOCKWISE_TYPES", "blockwise_layer_errors", "check_blockwise_method"]

logger = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class _Layout:
    """Where a decoder LM keeps its blocks, the norm after them and its output head."""

    blocks: str
    norm: str
    head: str


_LLAMA = _Layout(blocks="model.layers", norm="model.norm", head="lm_head")
# model_type → layout. Only decoders whose blocks all take the inputs block 0 takes (one mask
# type, the same position embeddings), and whose forward does nothing between blocks.
_LAYOUTS = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": _Layout(blocks="transformer.h", norm="transformer.ln_f", head="lm_head"),
}
BLOCKWISE_TYPES = tuple(_LAYOUTS)


def check_blockwise_method(method: str) -> None:
    """Block-wise analysis computes the ``layer`` method only; any other is an error."""
    if method != "layer":
        raise InputError(
            f"block-wise analysis computes the layer method only, not {method!r}: pass "
            "method layer (fisher and e2e need the whole model's forward and backward)"
        )


def _layout(model: SkeletonModel) -> _Layout:
    layout = _LAYOUTS.get(model.model_type)
    if layout is None or model.task != "text-generation":
        raise InputError(
            f"block-wise analysis supports decoder language models ({', '.join(_LAYOUTS)}; "
            f"task text-generation); {model.ref} is a {model.model_type or 'model'} for "
            f"{model.task}: analyze it whole"
        )
    layer_types = getattr(getattr(model.module, "config", None), "layer_types", None)
    if layer_types and len(set(layer_types)) > 1:
        raise InputError(
            f"{model.ref}: its blocks use different attention types "
            f"({', '.join(sorted(set(layer_types)))}), so they do not share block 0's inputs; "
            "analyze it whole"
        )
    return layout


def _block_list(module: nn.Module, layout: _Layout) -> nn.ModuleList:
    blocks = module.get_submodule(layout.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise InputError(f"{layout.blocks} is a {type(blocks).__name__}, not a list of blocks")
    return blocks


@dataclass
class _Inputs:
    """One batch's inputs of the current block: ``args[0]`` is the hidden states."""

    args: list[Any]
    kwargs: dict[str, Any]
    mask: torch.Tensor | None


class _Caught(Exception):
    """Raised by the hook on block 0 once its inputs are recorded: the rest of the forward is
    the blocks', which run later one at a time."""


def _mask_of(item: _Inputs | Batch) -> torch.Tensor | None:
    """The attention mask of a cached block input or of a batch of model inputs."""
    return item.mask if isinstance(item, _Inputs) else item.get("attention_mask")


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
            mask_of=_mask_of,
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


def _capture(
    run: _Run, layout: _Layout, layers: Sequence[QuantLayer], batches: Callable[[], Iterable[Batch]]
) -> tuple[list[_Inputs], dict[str, InputStats]]:
    """Run the model up to block 0 on every batch: that block's inputs, and the statistics of
    ``layers`` (the planned layers in front of the blocks)."""
    module = run.model.module
    cached: list[_Inputs] = []
    mask: list[torch.Tensor | None] = [None]

    def catch(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cached.append(_Inputs(args=list(args), kwargs=dict(kwargs), mask=mask[0]))
        raise _Caught

    def forward(batch: Batch) -> None:
        mask[0] = batch.get("attention_mask")
        try:
            module(**batch, use_cache=False)
        except _Caught:
            return
        raise InputError(f"{run.model.ref}: the forward pass never reached {layout.blocks}.0")

    first = _block_list(module, layout)[0]
    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        stats = run.stats(layers, batches, forward)
    finally:
        handle.remove()
    return cached, stats


def _run_block(block: nn.Module) -> Callable[[_Inputs], None]:
    """Run ``block`` on one cached input and put its output in its place: the next block's
    input (the hidden states, whatever else a block returns)."""

    def forward(inputs: _Inputs) -> None:
        out = block(*inputs.args, **inputs.kwargs)
        inputs.args[0] = out[0] if isinstance(out, tuple) else out

    return forward


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
    layout = _layout(model)
    module, ckpt, device = model.module, model.checkpoint, model.device
    n_blocks = len(_block_list(module, layout))
    blocks = [f"{layout.blocks}.{i}" for i in range(n_blocks)]
    tail = [layout.norm, layout.head]

    def under(name: str, prefixes: Sequence[str]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    by_stage: list[list[QuantLayer]] = [[] for _ in range(n_blocks + 2)]
    for lay in model.layers:
        i = next((i for i, p in enumerate(blocks) if under(lay.name, [p])), None)
        stage = i + 1 if i is not None else (n_blocks + 1 if under(lay.name, tail) else 0)
        by_stage[stage].append(lay)
    run = _Run(
        model=model,
        formats=formats,
        rounder=rounder,
        progress=progress,
        should_cancel=should_cancel,
        n_layers=len(model.layers),
        collect_total=(n_batches or 0) * (n_blocks + 2),
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

    front = [s for s in slots_under(module) if not under(s, [layout.blocks, *tail])]
    ckpt.materialize(module, front, device)
    try:
        cached, stats = _capture(run, layout, by_stage[0], batches)
        score(by_stage[0], stats)
    finally:
        ckpt.release(module, front)
    logger.info("block-wise: %d batches cached at the input of %d blocks", len(cached), n_blocks)
    for i, prefix in enumerate(blocks, start=1):
        slots = slots_under(module, prefix)
        ckpt.materialize(module, slots, device)
        try:
            stats = run.stats(by_stage[i], lambda: cached, _run_block(module.get_submodule(prefix)))
            score(by_stage[i], stats)
        finally:
            ckpt.release(module, slots)
        del stats
    slots = [s for p in tail for s in slots_under(module, p)]
    ckpt.materialize(module, slots, device)
    try:
        norm, head = (module.get_submodule(p) for p in tail)
        with _hooks_only(head):
            stats = run.stats(by_stage[-1], lambda: cached, lambda x: head(norm(x.args[0])))
        score(by_stage[-1], stats)
    finally:
        ckpt.release(module, slots)
    cached.clear()  # the activations go before the tied weights are read again
    run.score(
        tied,
        tied_stats,
        lambda lay: weight_matrix(ckpt.tensor(lay.param, device), lay.kind),
        scores,
    )
    return scores
