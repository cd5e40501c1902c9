"""``builtin:tiny-lm`` as a transformers model: the OPT twin the Hugging Face targets write.

The ``torchao`` and ``compressed-tensors`` targets write a folder that transformers loads, so
the builtin LM needs an architecture transformers ships whose arithmetic is the builtin model's.
:class:`~bitplan.sensitivity.builtin_nets.TinyLM` is a pre-LayerNorm GPT; transformers' **OPT**
(``OPTForCausalLM``, ``models/opt/modeling_opt.py``) computes the same function, and unlike
GPT-2 (whose ``Conv1D`` layers hold q, k and v as one ``[in, 3·out]`` matrix, which neither
torchao nor compressed-tensors quantizes) it keeps every projection a separate ``nn.Linear``,
so each planned layer stays one tensor with its own format. Piece by piece (this config):

- embeddings: ``wte`` + ``wpe[t]`` is OPT's ``embed_tokens`` + ``embed_positions[t + 2]``:
  learned absolute positions (OPT's table has 2 leading rows, below);
- ``ln_1``/``ln_2``/``ln_f`` are ``self_attn_layer_norm``/``final_layer_norm`` (pre-norm,
  ``do_layer_norm_before``) and the decoder's ``final_layer_norm``: ``nn.LayerNorm``, affine,
  eps 1e-5 in both;
- q/k/v/o are ``q_proj``/``k_proj``/``v_proj``/``out_proj``, ``nn.Linear`` with biases
  (``enable_bias``); TinyLM calls SDPA with its default scale ``1/√head_dim``, OPT scales
  ``q_proj(x)`` by ``head_dim^-0.5`` and calls SDPA with scale 1: for tiny-lm's heads of 16 the
  scale is 0.25, a power of two, so the two orders round alike;
- ``fc_in``/``fc_out`` are ``fc1``/``fc2`` (``ffn_dim`` = 4·n_embd) around the exact (erf)
  GELU: ``activation_function="gelu"`` is ``nn.functional.gelu``;
- ``lm_head`` is tied to the token embedding in both (``tie_word_embeddings``), no bias.

No weight of the builtin model changes (its hash is the plan's); the logits of the twin equal the
builtin model's (``tests/search/test_runtime_builtin_hf.py``). The one difference is the
position table: OPT keeps fairseq's offset of 2 (``OPTLearnedPositionalEmbedding.offset``), so
``embed_positions`` has ``block_size + 2`` rows, row ``t + 2`` being ``wpe[t]``. The two leading
rows are zeros: row 1 is what OPT reads for padding positions (``cumsum(mask) - 1 = -1``), whose
outputs are ignored (as TinyLM's are), and row 0 is never read. They are the only bytes the twin
adds: two rows in the layer's planned format, or at its dtype when it is not planned.

The byte tokenizer becomes a transformers tokenizer with the same ids: a byte-level BPE of 256
tokens (GPT-2's printable stand-in for each byte, ``bytes_to_unicode``) and no merges, so every
UTF-8 byte is one token whose id is its value, and decoding gives the text back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import torch
from torch import nn

from bitplan.sensitivity.builtin_nets import TinyLM
from bitplan.sensitivity.errors import InputError

if TYPE_CHECKING:
    from transformers import OPTForCausalLM, PreTrainedTokenizerFast

__all__ = ["TWIN_ARCHITECTURE", "OptTwin", "byte_tokenizer", "opt_twin"]

TWIN_ARCHITECTURE: Final = "OPTForCausalLM"
# nn.LayerNorm's default epsilon, the one OPT's layers are built with (no config field sets it).
_OPT_LN_EPS = 1e-5
# A block's modules: TinyLM's name under blocks.{i} -> OPT's under model.decoder.layers.{i}.
_BLOCK_MODULES = (
    ("attn", "self_attn"),
    ("ln_1", "self_attn_layer_norm"),
    ("attn.q_proj", "self_attn.q_proj"),
    ("attn.k_proj", "self_attn.k_proj"),
    ("attn.v_proj", "self_attn.v_proj"),
    ("attn.o_proj", "self_attn.out_proj"),
    ("ln_2", "final_layer_norm"),
    ("fc_in", "fc1"),
    ("fc_out", "fc2"),
)
_POSITIONS = "wpe"


@dataclass(frozen=True)
class OptTwin:
    """A :class:`TinyLM` as an ``OPTForCausalLM`` with the same weights and outputs.

    ``modules`` maps every TinyLM module name (blocks and leaves) to the twin's;
    ``position_rows`` is the number of rows OPT's position table has in front of ``wpe``.
    """

    module: OPTForCausalLM
    modules: dict[str, str]
    position_rows: int

    def hf_name(self, name: str) -> str:
        """The twin's name of a TinyLM module or parameter (``blocks.0.fc_in.weight`` ->
        ``model.decoder.layers.0.fc1.weight``)."""
        if name in self.modules:
            return self.modules[name]
        parent, _, leaf = name.rpartition(".")
        if parent in self.modules:
            return f"{self.modules[parent]}.{leaf}"
        raise KeyError(f"{name} is no module or parameter of builtin:tiny-lm")


def _module_names(n_layer: int) -> dict[str, str]:
    names = {
        "wte": "model.decoder.embed_tokens",
        _POSITIONS: "model.decoder.embed_positions",
        "ln_f": "model.decoder.final_layer_norm",
        "lm_head": "lm_head",
    }
    for i in range(n_layer):
        names[f"blocks.{i}"] = f"model.decoder.layers.{i}"
        for ours, theirs in _BLOCK_MODULES:
            names[f"blocks.{i}.{ours}"] = f"model.decoder.layers.{i}.{theirs}"
    return names


def _check_arithmetic(module: TinyLM) -> None:
    """Refuse a TinyLM whose arithmetic OPT's code would not reproduce."""
    c = module.config
    if c.n_embd % c.n_head:
        raise InputError(f"tiny-lm's width {c.n_embd} does not split into {c.n_head} heads")
    for name, m in module.named_modules():
        if isinstance(m, nn.LayerNorm) and (m.eps != _OPT_LN_EPS or not m.elementwise_affine):
            raise InputError(
                f"tiny-lm's {name} has eps {m.eps} (affine {m.elementwise_affine}); OPT's layer "
                f"norms are affine with eps {_OPT_LN_EPS}, so it has no transformers twin"
            )


def opt_twin(module: TinyLM) -> OptTwin:
    """The ``OPTForCausalLM`` computing what ``module`` computes, with copies of its weights.

    Built on the device and in the dtype of ``module``'s weights, in eval mode; ``module`` is
    not changed.
    """
    from transformers import OPTConfig, OPTForCausalLM
    from transformers.models.opt.modeling_opt import OPTLearnedPositionalEmbedding

    _check_arithmetic(module)
    c = module.config
    tied = module.lm_head.weight is module.wte.weight
    config = OPTConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        word_embed_proj_dim=c.n_embd,  # no project_in/out
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        ffn_dim=module.get_parameter("blocks.0.fc_in.bias").numel(),  # the MLP's width
        max_position_embeddings=c.block_size,
        activation_function="gelu",
        do_layer_norm_before=True,
        enable_bias=True,
        layer_norm_elementwise_affine=True,
        dropout=0.0,
        attention_dropout=0.0,
        layerdrop=0.0,
        tie_word_embeddings=tied,
        pad_token_id=0,  # ByteTokenizer pads with byte 0
        bos_token_id=None,  # bytes have no begin/end-of-text token: nothing is added to a
        eos_token_id=None,  # prompt and a generation runs its max_new_tokens
        dtype=module.wte.weight.dtype,  # else a loader guesses it from the first tensor it reads
    )
    weight = module.wte.weight
    twin = OPTForCausalLM(config)
    # nn.Module's own methods: transformers' overrides are a decorated .to that mypy sees as
    # unbound and an untyped .eval
    nn.Module.to(twin, device=weight.device, dtype=weight.dtype)
    nn.Module.eval(twin)
    names = _module_names(c.n_layer)
    positions = twin.get_submodule(names[_POSITIONS])
    if not isinstance(positions, OPTLearnedPositionalEmbedding):  # transformers renamed it
        raise TypeError(f"OPT's {names[_POSITIONS]} is a {type(positions).__name__}")
    offset = positions.offset
    state: dict[str, torch.Tensor] = {}
    for pname, p in module.state_dict().items():
        parent, _, leaf = pname.rpartition(".")
        value = p.detach()
        if parent == _POSITIONS:  # OPT reads row t + offset for position t
            value = torch.cat([value.new_zeros(offset, value.shape[1]), value])  # (T + 2, D)
        state[f"{names[parent]}.{leaf}"] = value
    twin.load_state_dict(state, strict=True)  # copies: the builtin model stays as it was
    if tied:
        twin.tie_weights()
    return OptTwin(module=twin, modules=names, position_rows=offset)


def byte_tokenizer(*, max_length: int) -> PreTrainedTokenizerFast:
    """A transformers tokenizer with :class:`~bitplan.sensitivity.builtin_nets.ByteTokenizer`'s
    ids: UTF-8 bytes, padding on the right with byte 0 (module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    stand_in: dict[int, str] = bytes_to_unicode()  # type: ignore[no-untyped-call]
    vocab = {stand_in[b]: b for b in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        pad_token=stand_in[0],
        model_max_length=max_length,
        padding_side="right",
    )
