"""A decoder LM run one transformer block at a time: the pass that block-wise analysis and the
block-wise measurement of plans share.

A decoder LM computes the inputs of block ``i + 1`` from the outputs of block ``i`` alone, so the
model never has to be whole in memory: the way GPTQ-style tools process LLMs sequentially
(Frantar et al. 2022, §4 "Step 3"; AutoGPTQ and llm-compressor's sequential pipelines). A pass
over a fixed list of batches has three kinds of stage, each reading only its own weights from
the safetensors files (:class:`~bitplan.sensitivity.lazy_hf.Checkpoint`) and dropping them
when it is done:

1. **front**: the parameters in front of the blocks (token and position embeddings). The model
   runs on each batch until block 0 is called; a hook there records the block's inputs (hidden
   states, attention mask, position embeddings, …) and stops the forward (the "catcher" of
   GPTQ tools, :func:`catching`).
2. **block** ``i``: the block runs on every cached input, and its output (in the checkpoint
   dtype) replaces the hidden states in place: the next block's input (:func:`block_forward`).
3. **tail**: the final norm and the LM head on the last block's outputs (:func:`tail_forward`).

The operations are the whole model's, on the same tensors, in the same order, so a pass gives
the whole model's numbers to the last bit (the tests check it). :func:`stream_logits` is that
pass producing each batch's logits, with a hook that may change a stage's weights once they are
read (the streamed measurement of a plan fake-quantizes them there);
:mod:`bitplan.sensitivity.blockwise` collects the ``layer`` method's statistics stage by stage.

Memory: one stage's weights, plus the cached activations of every batch
(``samples × tokens × hidden × dtype bytes``: 128 samples of 2048 tokens at hidden size 8192 in
bf16 are 4 GiB) and what the model passes every block (the attention mask and the rotary
cos/sin of each batch), plus one batch's output at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.half_products import float32_products
from bitplan.sensitivity.layers import QuantLayer
from bitplan.sensitivity.lazy_hf import SkeletonModel, slots_under
from bitplan.sensitivity.progress import CancelFn, check_cancel

__all__ = [
    "BLOCKWISE_TYPES",
    "Batch",
    "BlockInputs",
    "Layout",
    "Stages",
    "block_forward",
    "catching",
    "decoder_layout",
    "mask_of",
    "stream_logits",
    "tail_forward",
]

Batch = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """Where a decoder LM keeps its blocks, the norm after them and its output head."""

    blocks: str
    norm: str
    head: str


_LLAMA = Layout(blocks="model.layers", norm="model.norm", head="lm_head")
# model_type → layout. Only decoders whose blocks all take the inputs block 0 takes (one mask
# type, the same position embeddings), and whose forward does nothing between blocks.
_LAYOUTS = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": Layout(blocks="transformer.h", norm="transformer.ln_f", head="lm_head"),
}
BLOCKWISE_TYPES = tuple(_LAYOUTS)


def decoder_layout(model: SkeletonModel) -> Layout:
    """The layout of ``model``, or an :class:`InputError` saying block-wise runs cannot take it."""
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


def _block_list(module: nn.Module, layout: Layout) -> nn.ModuleList:
    blocks = module.get_submodule(layout.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise InputError(f"{layout.blocks} is a {type(blocks).__name__}, not a list of blocks")
    return blocks


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class Stages:
    """The stages of a pass over ``module``: the front's parameter slots, the blocks' prefixes
    (``model.layers.3``) and the tail's submodules (the final norm and the head)."""

    front: list[str]
    blocks: list[str]
    tail: list[str]

    @classmethod
    def of(cls, module: nn.Module, layout: Layout) -> Stages:
        n_blocks = len(_block_list(module, layout))
        tail = [layout.norm, layout.head]
        front = [s for s in slots_under(module) if not _under(s, [layout.blocks, *tail])]
        return cls(front=front, blocks=[f"{layout.blocks}.{i}" for i in range(n_blocks)], tail=tail)

    def tail_slots(self, module: nn.Module) -> list[str]:
        return [s for prefix in self.tail for s in slots_under(module, prefix)]

    def split(self, layers: Sequence[QuantLayer]) -> list[list[QuantLayer]]:
        """``layers`` by the stage that runs them: front, each block, tail."""
        by_stage: list[list[QuantLayer]] = [[] for _ in range(len(self.blocks) + 2)]
        for lay in layers:
            i = next((i for i, p in enumerate(self.blocks) if _under(lay.name, [p])), None)
            if i is not None:
                by_stage[i + 1].append(lay)
            else:
                by_stage[-1 if _under(lay.name, self.tail) else 0].append(lay)
        return by_stage


@dataclass
class BlockInputs:
    """One batch's inputs of the current block: ``args[0]`` is the hidden states."""

    args: list[Any]
    kwargs: dict[str, Any]
    mask: torch.Tensor | None


class _Caught(Exception):
    """Raised by the hook on block 0 once its inputs are recorded: the rest of the forward is
    the blocks', which run later one at a time."""


def mask_of(item: BlockInputs | Batch) -> torch.Tensor | None:
    """The attention mask of a cached block input or of a batch of model inputs."""
    return item.mask if isinstance(item, BlockInputs) else item.get("attention_mask")


@contextmanager
def catching(
    model: SkeletonModel, layout: Layout
) -> Iterator[tuple[list[BlockInputs], Callable[[Batch], None]]]:
    """``(cached, forward)``: ``forward(batch)`` runs the model up to block 0 (the front's
    weights must be loaded) and appends the block's inputs to ``cached``."""
    module = model.module
    cached: list[BlockInputs] = []
    mask: list[torch.Tensor | None] = [None]

    def catch(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cached.append(BlockInputs(args=list(args), kwargs=dict(kwargs), mask=mask[0]))
        raise _Caught

    def forward(batch: Batch) -> None:
        mask[0] = batch.get("attention_mask")
        try:
            with float32_products(module):
                module(**batch, use_cache=False)
        except _Caught:
            return
        raise InputError(f"{model.ref}: the forward pass never reached {layout.blocks}.0")

    handle = _block_list(module, layout)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        yield cached, forward
    finally:
        handle.remove()


def block_forward(block: nn.Module) -> Callable[[BlockInputs], None]:
    """Run ``block`` on one cached input and put its output in its place: the next block's
    input (the hidden states, whatever else a block returns)."""

    def forward(inputs: BlockInputs) -> None:
        with float32_products(block):
            out = block(*inputs.args, **inputs.kwargs)
        inputs.args[0] = out[0] if isinstance(out, tuple) else out

    return forward


def tail_forward(module: nn.Module, layout: Layout) -> Callable[[BlockInputs], Any]:
    """The head on the final norm of the last block's output: the model's logits, as its own
    forward computes them (every position kept)."""
    norm, head = (module.get_submodule(p) for p in (layout.norm, layout.head))

    def forward(inputs: BlockInputs) -> Any:
        with float32_products(head):
            return head(norm(inputs.args[0]))

    return forward


def stream_logits(
    model: SkeletonModel,
    batches: Callable[[], Iterable[Batch]],
    *,
    prepare: Callable[[Sequence[str]], None] | None = None,
    should_cancel: CancelFn | None = None,
) -> Iterator[torch.Tensor]:
    """The logits ``[B, T, V]`` of every batch of ``batches()``, in order, computed stage by
    stage as the module docstring describes; ``batches()`` yields input dicts on
    ``model.device``.

    ``prepare(slots)`` runs each time a stage's parameter slots have been read, before the stage
    runs (it may change their values in place). The logits come during the tail stage, one
    batch at a time; the generator holds the tail's weights until it is exhausted or closed.
    """
    if model.checkpoint is None:
        raise TypeError("stream_logits needs a skeleton from load_skeleton")
    layout = decoder_layout(model)
    module, ckpt, device = model.module, model.checkpoint, model.device
    stages = Stages.of(module, layout)

    def load(slots: Sequence[str]) -> AbstractContextManager[None]:
        return ckpt.loaded(module, slots, device)

    def ready(slots: Sequence[str]) -> None:
        if prepare is not None:
            prepare(slots)

    with load(stages.front), catching(model, layout) as (cached, forward), torch.no_grad():
        ready(stages.front)
        for batch in batches():
            check_cancel(should_cancel)
            forward(batch)
    for prefix in stages.blocks:
        slots = slots_under(module, prefix)
        with load(slots), torch.no_grad():
            ready(slots)
            run = block_forward(module.get_submodule(prefix))
            for inputs in cached:
                check_cancel(should_cancel)
                run(inputs)
    slots = stages.tail_slots(module)
    with load(slots):
        ready(slots)
        logits_of = tail_forward(module, layout)
        while cached:
            with torch.no_grad():  # not around the yield: the caller's grad mode is its own
                logits: torch.Tensor = logits_of(cached.pop(0))
            yield logits
