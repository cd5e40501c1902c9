"""What llama.cpp expects of each model bitplan writes as GGUF: architecture, tensors, metadata.

llama.cpp builds a model from an architecture name, fixed tensor names and shapes, and a few
``{arch}.*`` hyperparameters (``load_arch_tensors`` / ``load_arch_hparams`` in its
``src/models/*.cpp``). This module says, for each model bitplan can write, which GGUF tensor is
made of which model parameters; :mod:`bitplan.search.runtime_gguf` does the writing.

- ``builtin:tiny-lm`` → ``gpt2``: learned position embeddings, LayerNorm with bias, a GELU MLP.
  llama.cpp's ``gpt2`` reads attention as ONE fused ``attn_qkv`` tensor: the rows of q, k and v
  concatenated (biases likewise), so the three layers must share one format. The head is tied
  to the token embedding, so there is no ``output`` tensor: llama.cpp reuses ``token_embd``.
- a Hugging Face GPT-2 (``GPT2LMHeadModel``) → ``gpt2``; its ``c_attn`` is already fused.
  transformers' Conv1D stores ``[in, out]``; GGUF wants ``[out, in]`` rows, as bitplan plans them.
  llama.cpp's gpt2 always divides attention scores by √head_dim, so a config that turns that
  off (``scale_attn_weights=False``) or scales otherwise is refused.
- a Hugging Face LLaMA (``LlamaForCausalLM``) → ``llama``. llama.cpp's rope rotates pairs of
  adjacent values, transformers' rotates the two halves of a head, so the rows of q and k are
  permuted within each head exactly as ``convert_hf_to_gguf.py`` does. Whole rows move, and
  llama.cpp's blocks run along a row, so a permuted matrix quantizes to the permuted blocks of
  the original: the bytes and the plan's arithmetic are unchanged.

Hugging Face parameter names map to GGUF names through gguf-py's ``TensorNameMap``, the table
llama.cpp's own converter uses. Anything these maps cannot express (another architecture, rope
scaling, an activation llama.cpp does not run for the architecture) is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import gguf
import torch
from torch import nn

from bitplan.sensitivity.builtin_nets import TinyLM
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.layers import LayerKind, find_quant_layers, weight_matrix

__all__ = ["GgufLayout", "GgufTensor", "gguf_layout", "rope_rows", "tensor_values", "weight_kinds"]

# GPT-2's activations that llama.cpp's gpt2 graph computes as its (tanh) GELU; an exact-erf GELU
# differs from it by at most 4.7e-4 (at x ≈ 2.7), less than the float16 rounding of llama.cpp's
# GELU table there (up to 1e-3).
_GELU_ACTS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class GgufTensor:
    """One GGUF tensor: the model parameters whose rows it concatenates, in order.

    A weight's rows are its ``[rows, cols]`` matrix (:func:`~bitplan.sensitivity.layers.
    weight_matrix`); 1-D parameters (norms, biases) are concatenated as they are.
    ``rope_heads`` permutes the rows for llama.cpp's rope layout (LLaMA's q and k).
    """

    name: str
    sources: tuple[str, ...]
    rope_heads: int | None = None


@dataclass(frozen=True)
class GgufLayout:
    """An architecture's GGUF form: its name, tensors in file order, hyperparameters, vocab size."""

    arch: str
    tensors: list[GgufTensor]
    add_hparams: Callable[[gguf.GGUFWriter], None]
    vocab_size: int


def _name(tensor: gguf.MODEL_TENSOR, suffix: str, bid: int | None = None) -> str:
    return f"{gguf.TENSOR_NAMES[tensor].format(bid=bid)}.{suffix}"


def _tiny_lm(module: TinyLM) -> GgufLayout:
    c = module.config
    mt = gguf.MODEL_TENSOR
    n_ff = module.get_parameter("blocks.0.fc_in.bias").numel()  # the MLP's width

    def norm(tensor: gguf.MODEL_TENSOR, prefix: str, bid: int | None = None) -> list[GgufTensor]:
        return [GgufTensor(_name(tensor, s, bid), (f"{prefix}.{s}",)) for s in ("weight", "bias")]

    tensors = [
        GgufTensor(_name(mt.TOKEN_EMBD, "weight"), ("wte.weight",)),
        GgufTensor(_name(mt.POS_EMBD, "weight"), ("wpe.weight",)),
        *norm(mt.OUTPUT_NORM, "ln_f"),
    ]
    if module.lm_head.weight is not module.wte.weight:
        tensors.append(GgufTensor(_name(mt.OUTPUT, "weight"), ("lm_head.weight",)))
    for i in range(c.n_layer):
        p = f"blocks.{i}"
        qkv = [f"{p}.attn.{x}_proj" for x in ("q", "k", "v")]
        tensors += [
            *norm(mt.ATTN_NORM, f"{p}.ln_1", i),
            GgufTensor(_name(mt.ATTN_QKV, "weight", i), tuple(f"{m}.weight" for m in qkv)),
            GgufTensor(_name(mt.ATTN_QKV, "bias", i), tuple(f"{m}.bias" for m in qkv)),
            GgufTensor(_name(mt.ATTN_OUT, "weight", i), (f"{p}.attn.o_proj.weight",)),
            GgufTensor(_name(mt.ATTN_OUT, "bias", i), (f"{p}.attn.o_proj.bias",)),
            *norm(mt.FFN_NORM, f"{p}.ln_2", i),
            GgufTensor(_name(mt.FFN_UP, "weight", i), (f"{p}.fc_in.weight",)),
            GgufTensor(_name(mt.FFN_UP, "bias", i), (f"{p}.fc_in.bias",)),
            GgufTensor(_name(mt.FFN_DOWN, "weight", i), (f"{p}.fc_out.weight",)),
            GgufTensor(_name(mt.FFN_DOWN, "bias", i), (f"{p}.fc_out.bias",)),
        ]

    def add_hparams(w: gguf.GGUFWriter) -> None:
        w.add_context_length(c.block_size)  # = rows of position_embd, which llama.cpp checks
        w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(n_ff)
        w.add_block_count(c.n_layer)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(module.ln_f.eps)

    return GgufLayout("gpt2", tensors, add_hparams, c.vocab_size)


def _mapped(
    module: nn.Module, arch: gguf.MODEL_ARCH, blocks: int, rope: dict[str, int] | None = None
) -> list[GgufTensor]:
    """Every parameter under its GGUF name (gguf-py's converter table); a tied one once."""
    names = gguf.get_tensor_name_map(arch, blocks)
    tensors = []
    for pname, _ in module.named_parameters():  # a tied parameter once, under its first name
        gname = names.get_name(pname, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise InputError(
                f"parameter {pname} has no GGUF name in llama.cpp's "
                f"{gguf.MODEL_ARCH_NAMES[arch]} architecture; this model cannot be written as GGUF"
            )
        heads = next((h for key, h in (rope or {}).items() if f".{key}." in f".{gname}"), None)
        tensors.append(GgufTensor(gname, (pname,), heads))
    return tensors


def _refuse(what: str, value: Any, fix: str) -> InputError:
    return InputError(f"the GGUF target cannot write a model with {what}={value!r}: {fix}")


def _hf_gpt2(module: nn.Module, config: Any) -> GgufLayout:
    act = getattr(config, "activation_function", "gelu_new")
    if act not in _GELU_ACTS:
        raise _refuse("activation_function", act, "llama.cpp's gpt2 runs a GELU MLP")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(config, flag, False):
            raise _refuse(flag, True, "llama.cpp's gpt2 attention has no such option")
    if not getattr(config, "scale_attn_weights", True):
        raise _refuse(
            "scale_attn_weights", False, "llama.cpp's gpt2 always scales attention by 1/√head_dim"
        )
    tensors = _mapped(module, gguf.MODEL_ARCH.GPT2, config.n_layer)

    def add_hparams(w: gguf.GGUFWriter) -> None:
        w.add_context_length(config.n_positions)
        w.add_embedding_length(config.n_embd)
        w.add_feed_forward_length(config.n_inner or 4 * config.n_embd)  # GPT-2's default MLP
        w.add_block_count(config.n_layer)
        w.add_head_count(config.n_head)
        w.add_layer_norm_eps(config.layer_norm_epsilon)

    return GgufLayout("gpt2", tensors, add_hparams, config.vocab_size)


def _hf_llama(module: nn.Module, config: Any) -> GgufLayout:
    if config.hidden_act != "silu":
        raise _refuse("hidden_act", config.hidden_act, "llama.cpp's llama runs a SiLU MLP")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type") or "default"
    if rope_type != "default":
        raise _refuse(
            "rope_type", rope_type, "only plain rope is written; convert with llama.cpp's script"
        )
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    n_head, n_kv = (
        config.num_attention_heads,
        config.num_key_value_heads or config.num_attention_heads,
    )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    tensors = _mapped(
        module, gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers, {"attn_q": n_head, "attn_k": n_kv}
    )

    def add_hparams(w: gguf.GGUFWriter) -> None:
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_block_count(config.num_hidden_layers)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(theta)
        w.add_layer_norm_rms_eps(config.rms_norm_eps)

    return GgufLayout("llama", tensors, add_hparams, config.vocab_size)


# Hugging Face causal LMs the GGUF target writes: config.model_type -> layout.
_HF: dict[str, Callable[[nn.Module, Any], GgufLayout]] = {"gpt2": _hf_gpt2, "llama": _hf_llama}


def gguf_layout(module: nn.Module) -> GgufLayout:
    """The GGUF form of ``module``; an architecture llama.cpp cannot be given is an InputError."""
    if isinstance(module, TinyLM):
        return _tiny_lm(module)
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    causal = type(module).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    if model_type in _HF and causal:
        return _HF[str(model_type)](module, config)
    raise InputError(
        f"the GGUF target writes builtin:tiny-lm and Hugging Face causal LMs of type "
        f"{', '.join(_HF)}; this model is {type(module).__name__} ({model_type or 'no config'})"
    )


def rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q or k in llama.cpp's rope order (``convert_hf_to_gguf.py``'s ``permute``).

    Within each head, row ``h·d + 2j`` takes the original row ``h·d + j`` and row ``h·d + 2j + 1``
    the row ``h·d + d/2 + j`` (``d`` = rows per head): halves become interleaved pairs.
    """
    rows = w.shape[0]
    split = w.reshape(heads, 2, rows // heads // 2, *w.shape[1:])  # (heads, 2, d/2, …)
    return split.transpose(1, 2).reshape(w.shape)  # (heads, d/2, 2, …) -> (rows, …)


def tensor_values(
    params: Mapping[str, torch.Tensor], tensor: GgufTensor, kinds: Mapping[str, LayerKind]
) -> torch.Tensor:
    """The tensor's values (on the CPU, in the parameters' dtype): rows of its sources stacked.

    ``params`` are the model's named parameters; ``kinds`` maps the names of plannable weights
    to their layer kind, so each weight is seen as its ``[rows, cols]`` matrix.
    """
    parts = []
    for source in tensor.sources:
        p = params[source].detach()
        parts.append(weight_matrix(p, kinds[source]) if source in kinds else p)
    values = torch.cat(parts).to("cpu")  # (Σ rows, cols) or (Σ n,)
    return rope_rows(values, tensor.rope_heads) if tensor.rope_heads else values


def weight_kinds(module: nn.Module) -> dict[str, LayerKind]:
    """``{parameter name: layer kind}`` of every plannable weight of ``module``."""
    return {lay.param: lay.kind for lay in find_quant_layers(module)}
