"""Which compressed-tensors scheme stores each planned layer, and which plans vLLM can serve.

A compressed-tensors checkpoint (the format vLLM and transformers read through the
``compressed-tensors`` package) lists *config groups*: one quantization scheme each
(``weights: {num_bits, type, symmetric, strategy, group_size}``) and the module names it
``targets``. This module maps each planned layer to the scheme that reproduces bitplan's
arithmetic exactly (DESIGN §3), so that decompressing the checkpoint gives bitplan's weights:

- ``int{b}-g{G}[-asym]`` → ``type: int, strategy: group, group_size: G``; ``int{b}[-asym]`` and a
  group at least as wide as the row (bitplan then uses one group a row) → ``strategy: channel``.
  Stored ``pack-quantized``. compressed-tensors' groups must tile the row exactly, so a row whose
  length ``G`` does not divide is refused (bitplan's shorter last group has no equivalent).
- ``fp8-e4m3`` (per-row scale) → ``type: float, num_bits: 8, strategy: channel``, stored
  ``float-quantized`` (weight-only: vLLM serves it as W8A16-FP8).
- ``fp16``/``bf16``/``fp32`` → not quantized: the module is listed under ``ignore``.
- llama.cpp block formats have no compressed-tensors scheme and are refused.

With ``vllm_checks`` (the default) plans vLLM cannot serve are refused too, each with a message
naming the layers and formats: integer widths other than 4 and 8 (vLLM's WNA16 kernels,
``WNA16_SUPPORTED_BITS``), a quantized output embedding (vLLM's LM head is no linear layer and
stays unquantized), and *fused* siblings in different formats: vLLM runs q/k/v and gate/up
projections as one matrix (``packed_modules_mapping``) and takes the first shard's scheme for
all of them. A plan searched with ``--fuse qkv,gate_up`` puts each such set in one share group,
so its members get one format by construction; the check stays for plans made without it.
``bitplan apply`` always checks; only a Python caller of the writer can pass
``vllm_checks=False``, and the checkpoint is then still exactly what compressed-tensors
decompresses (transformers loads it), for runtimes that neither fuse nor need those kernels.

References: compressed-tensors ``quantization/quant_args.py`` and ``compressors/``; vLLM
``model_executor/layers/quantization/compressed_tensors/compressed_tensors.py`` (``get_scheme``,
``find_matched_target``) and ``schemes/compressed_tensors_wNa16.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from torch import nn

from bitplan.search.plans import PlanLayer
from bitplan.search.targets import name_list
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.format_spec import QuantFormat

__all__ = ["FUSED_SIBLINGS", "VLLM_BITS", "LayerScheme", "check_fused", "layer_schemes"]

# Integer widths vLLM's compressed-tensors weight-only kernels take (WNA16_SUPPORTED_BITS).
VLLM_BITS = (4, 8)
# Module names vLLM fuses into one matrix when they share a parent (its models'
# packed_modules_mapping): LLaMA-style attention and MLP, BERT-style attention, DeepSeek's
# low-rank attention inputs.
FUSED_SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
)
_UNQUANTIZED = "unquantized"


@dataclass(frozen=True)
class LayerScheme:
    """How one planned layer is stored: the config group it belongs to and that group's scheme.

    ``group`` is the bitplan format with the same arithmetic as the stored scheme (the plan's
    format, or its per-row form when one group spans the row); it names the config group.
    """

    layer: PlanLayer
    group: str
    weights: QuantizationArgs
    compression: CompressionFormat


def _int_scheme(lay: PlanLayer, fmt: QuantFormat, cols: int) -> tuple[str, QuantizationArgs]:
    """The per-row or per-group integer scheme of ``fmt`` on rows of ``cols`` weights."""
    asym = "" if fmt.symmetric else "-asym"
    if fmt.group_size is None or fmt.group_size >= cols:  # bitplan: one group spans the row
        args = QuantizationArgs(
            num_bits=fmt.bits,
            type="int",
            symmetric=fmt.symmetric,
            strategy=QuantizationStrategy.CHANNEL,
        )
        return f"int{fmt.bits}{asym}", args
    if cols % fmt.group_size:
        raise InputError(
            f"{lay.name} has rows of {cols} weights, which groups of {fmt.group_size} "
            f"({fmt.name}) do not tile; compressed-tensors needs equal groups: plan it with "
            "a group size that divides the row, or per row"
        )
    args = QuantizationArgs(
        num_bits=fmt.bits,
        type="int",
        symmetric=fmt.symmetric,
        strategy=QuantizationStrategy.GROUP,
        group_size=fmt.group_size,
    )
    return fmt.name, args


def _scheme(lay: PlanLayer, module: nn.Module, *, vllm_checks: bool) -> LayerScheme:
    fmt = lay.format
    if fmt.kind == "ggml":
        raise InputError(
            f"{lay.name} is planned as {fmt.name}, a llama.cpp block format, which "
            "compressed-tensors cannot store; export this plan as GGUF instead"
        )
    if not isinstance(module, nn.Linear):
        raise InputError(
            f"{lay.name} ({type(module).__name__}) is planned as {fmt.name}, but "
            "compressed-tensors checkpoints quantize linear layers only; plan it as "
            "fp16/bf16 or exclude it"
        )
    if lay.tie is not None:
        raise InputError(
            f"{lay.name} shares its weight with other layers (tie group {lay.tie}) and is "
            f"planned as {fmt.name}; compressed-tensors stores one packed weight per "
            "layer: plan the tie group as fp16/bf16 or exclude it"
        )
    cols = module.in_features
    if fmt.kind == "fp8":
        args = QuantizationArgs(
            num_bits=8, type="float", symmetric=True, strategy=QuantizationStrategy.CHANNEL
        )
        return LayerScheme(lay, fmt.name, args, CompressionFormat.float_quantized)
    if vllm_checks and fmt.bits not in VLLM_BITS:
        raise InputError(
            f"{lay.name} is planned as {fmt.name}, but vLLM's compressed-tensors kernels take "
            f"{' or '.join(map(str, VLLM_BITS))}-bit integer weights; plan with int4/int8 "
            "formats (e.g. --formats int4-g128,int8,fp16)"
        )
    group, args = _int_scheme(lay, fmt, cols)
    return LayerScheme(lay, group, args, CompressionFormat.pack_quantized)


def _is_output_embedding(model: nn.Module, module: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return callable(get) and get() is module


def layer_schemes(
    *, model: nn.Module, layers: Sequence[PlanLayer], vllm_checks: bool = True
) -> dict[str, LayerScheme]:
    """``{layer name: scheme}`` for every planned layer in a quantized format.

    Layers in a float format are left out (they go to the config's ``ignore``). Raises
    :class:`InputError` for a layer compressed-tensors cannot store, and with ``vllm_checks``
    for plans vLLM cannot serve (module docstring); fused siblings are :func:`check_fused`'s.
    """
    schemes: dict[str, LayerScheme] = {}
    for lay in layers:
        if not lay.format.is_quantized:
            continue
        module = model.get_submodule(lay.name)
        if vllm_checks and _is_output_embedding(model, module):
            raise InputError(
                f"{lay.name} is the output embedding and planned as {lay.format.name}, but "
                "vLLM keeps the LM head of a compressed-tensors checkpoint unquantized; plan "
                "it as fp16/bf16 or exclude it"
            )
        schemes[lay.name] = _scheme(lay, module, vllm_checks=vllm_checks)
    return schemes


def _stored_as(name: str, schemes: dict[str, LayerScheme]) -> str:
    scheme = schemes.get(name)
    return _UNQUANTIZED if scheme is None else scheme.group


def check_fused(*, model: nn.Module, schemes: dict[str, LayerScheme]) -> None:
    """Refuse fused siblings (q/k/v, gate/up of one block) stored in different schemes.

    vLLM loads each sibling set as one matrix with one scheme; a set where some members are
    quantized and others not, or quantized differently, cannot be served. Float formats all
    count as unquantized: vLLM loads every unquantized layer in the model's dtype.
    """
    sets: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for name, module in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        for siblings in FUSED_SIBLINGS:
            if leaf in siblings and isinstance(module, nn.Linear):
                sets.setdefault((parent, siblings), []).append(name)
    conflicts = []
    for (parent, _), members in sets.items():
        stored = [_stored_as(m, schemes) for m in members]
        if len(set(stored)) > 1:
            leaves = "/".join(m.rpartition(".")[2] for m in members)
            conflicts.append(f"{leaves} of {parent or 'the model'} ({', '.join(stored)})")
    if conflicts:
        raise InputError(
            "vLLM fuses sibling layers into one matrix with one format, but the plan gives "
            f"them different formats: {name_list(conflicts)}; search with --fuse qkv,gate_up "
            "so that each set shares one format"
        )
