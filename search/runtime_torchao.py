"""``bitplan apply --to torchao``: a Hugging Face folder that transformers + torchao load as is.

The folder is what transformers writes for a torchao-quantized model (``save_pretrained`` with
a ``TorchAoConfig``): ``config.json`` whose ``quantization_config`` holds torchao's
``FqnToConfig`` (the per-module table of :func:`~bitplan.search.exports.torchao_config_of`),
and safetensors whose quantized weights are flattened torchao tensor subclasses
(``<module>._weight_qdata`` / ``_weight_scale`` / ``_weight_zero_point``, described in the
file's metadata). ``AutoModelForCausalLM.from_pretrained(folder)`` rebuilds the subclasses
(tested on the CPU).

The tensors hold **bitplan's own codes**, not torchao's: torchao's quantizer would choose other
scales (its symmetric int4 is ``absmax/7.5`` over -8..7, bitplan's ``absmax/7`` over -7..7, DESIGN
§3), so this module builds the subclasses from :func:`~bitplan.sensitivity.formats.quantize_codes`
and the loaded weights dequantize to exactly bitplan's fake-quantized values.

- ``int{b}[-gG][-asym]`` -> ``IntxUnpackedToInt8Tensor``: one int8 per code, float16 scales as
  bitplan stores them, an int8 zero point a group. torchao keeps int{b} codes in
  ``[-2^(b-1), 2^(b-1)-1]``, so asymmetric codes and zero points (``0..2^b-1`` in bitplan) are
  both shifted by ``-2^(b-1)``, which leaves ``q - zp`` unchanged; symmetric ones are stored
  as they are with zero point 0. A group at least as wide as the row is bitplan's one group a
  row (same scales, same bytes), stored per row (``PerAxis``), as torchao needs whole blocks.
- ``fp8-e4m3`` -> ``Float8Tensor`` with its per-row scale in float32 (torchao's scale dtype;
  the value is bitplan's float16 scale, exactly).
- ``fp32``/``bf16``/``fp16`` -> a plain tensor of that dtype; transformers casts it to the
  model's dtype on loading, which is exact.
- anything torchao has no form for (Conv layers, transformers' Conv1D, a group size narrower
  than the row that does not divide it, llama.cpp block formats) and quantized tied weights (a
  torchao tensor shared by two modules does not load: transformers' ``tie_weights`` compares the
  two with ``aten.equal``, which torchao's subclasses lack) -> the fake-quantized values as a plain
  tensor of the model's dtype: the same numbers, unpacked. Such layers are logged and listed.

torchao stores no sub-byte packing that loads on the CPU, so the bytes on disk exceed the plan's
``total_bytes``: ``numel + 3·n_groups`` bytes for an int layer (``numel + 4·rows`` for fp8)
against the plan's packed ``ceil((numel·b + 16·n_groups [+ b·n_groups])/8)``.
``bitplan-torchao.json`` in the folder lists, per layer, what was stored and its bytes next to
the plan's.

``builtin:tiny-lm`` is written as its transformers twin, an ``OPTForCausalLM`` with the same
weights and logits (:mod:`bitplan.search.builtin_hf`, :mod:`bitplan.search.hf_form`), and a
byte-level tokenizer with the builtin model's ids. The note then also says how it was converted:
the module names (the plan's are the builtin model's) and the bytes the twin adds (OPT's two
leading position rows), so that ``extra_bytes`` = the layers' torchao storage beyond the plan
(``bytes - plan_bytes`` summed) + the conversion's bytes.

torchao is imported with this module (the ``runtimes`` extra), before anything is changed; the
folder is staged and moved into place by :mod:`bitplan.search.hf_folder`.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torchao.core.config import config_from_dict
from torchao.quantization import Float8Tensor, FqnToConfig, IntxUnpackedToInt8Tensor

from bitplan.search.artifact import PLAN_FILE, ArtifactReport, tensor_sizes_of
from bitplan.search.exports import torchao_config_of, torchao_gap
from bitplan.search.hf_folder import staged_folder
from bitplan.search.hf_form import HfForm, hf_form
from bitplan.search.plans import Plan
from bitplan.search.targets import check_plan_matches
from bitplan.sensitivity.atomic import write_text_atomic
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import (
    FLOAT_DTYPES,
    QuantCodes,
    QuantFormat,
    fake_quantize,
)
from bitplan.sensitivity.layers import QuantLayer, get_weight, weight_matrix
from bitplan.sensitivity.rounder import Rounder
from bitplan.sensitivity.rounding import concat_codes

if TYPE_CHECKING:
    from bitplan.sensitivity.models import LoadedModel

__all__ = ["NOTE_FILE", "write_torchao"]

log = logging.getLogger(__name__)

NOTE_FILE = "bitplan-torchao.json"
NOTE_SCHEMA = "bitplan.torchao-note/v1"
# Rows are quantized in chunks of at most this many weights, so the float32 temporaries of
# quantize_codes stay a few 16 MiB buffers however large the layer is.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class _Stored:
    """How one planned tensor (a tie group once) went into the folder."""

    layers: tuple[str, ...]
    format: str
    stored_as: str
    bytes: int
    plan_bytes: int
    reason: str | None = None


def _codes(matrix: torch.Tensor, fmt: QuantFormat, rounder: Rounder, param: str) -> QuantCodes:
    """The codes of ``param``'s ``[rows, cols]`` matrix as the plan rounds them, a chunk of rows
    at a time."""
    step = max(1, _CHUNK_ELEMENTS // max(matrix.shape[1], 1))
    return concat_codes(
        [
            rounder.codes(param, matrix[s : s + step], fmt, row0=s)
            for s in range(0, matrix.shape[0], step)
        ]
    )


def _intx_tensor(matrix: torch.Tensor, fmt: QuantFormat, codes: QuantCodes) -> torch.Tensor:
    if codes.zero is None:
        q, zero = codes.q, torch.zeros_like(codes.scale, dtype=torch.int8)
    else:
        offset = 1 << (fmt.bits - 1)  # bitplan's 0..2^b-1 -> torchao's -2^(b-1)..2^(b-1)-1
        q, zero = codes.q - offset, codes.zero - offset
    cols = matrix.shape[1]
    tensor: torch.Tensor = IntxUnpackedToInt8Tensor(
        qdata=q.to(torch.int8),
        scale=codes.scale,
        zero_point=zero.to(torch.int8),
        target_dtype=getattr(torch, f"int{fmt.bits}"),
        block_size=[1, fmt.group_size or cols],
        dtype=matrix.dtype,
        activation_quantization=None,
    )
    return tensor


def _float8_tensor(matrix: torch.Tensor, codes: QuantCodes) -> torch.Tensor:
    tensor: torch.Tensor = Float8Tensor(
        codes.q,
        codes.scale.to(torch.float32),  # (rows, 1): torchao's scale dtype, bitplan's fp16 value
        block_size=[1, matrix.shape[1]],
        dtype=matrix.dtype,
    )
    return tensor


def _nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor or torchao subclass takes in safetensors (the sum of its data tensors)."""
    names = getattr(t, "tensor_data_names", None)
    if names is None:
        return t.numel() * t.element_size()
    return sum(_nbytes(getattr(t, n)) for n in names if getattr(t, n) is not None)


def _groups(model: LoadedModel, plan: Plan) -> list[tuple[list[QuantLayer], QuantFormat, int]]:
    """``(members, format, plan bytes)`` per planned tensor; a tie group is one tensor."""
    formats = {lay.name: (lay.format, lay.bytes) for lay in plan.layers}
    by_param: dict[str, list[QuantLayer]] = {}
    for lay in model.layers:
        by_param.setdefault(lay.param, []).append(lay)
    groups = []
    for members in by_param.values():
        chosen = [formats[m.name] for m in members if m.name in formats]
        if chosen:
            groups.append((members, chosen[0][0], chosen[0][1]))
    return groups


def _row_spanning(fmt: QuantFormat, cols: int) -> QuantFormat:
    """``int{b}-g{G}`` with ``G >= cols`` as the per-row ``int{b}`` it is (one group a row)."""
    if fmt.kind != "int" or fmt.group_size is None or fmt.group_size < cols:
        return fmt
    return replace(fmt, name=fmt.name.replace(f"-g{fmt.group_size}", ""), group_size=None)


def _store(
    module: nn.Module, members: list[QuantLayer], fmt: QuantFormat, rounder: Rounder
) -> tuple[str, str | None, dict[str, Any] | None]:
    """Put one planned tensor into ``module`` in its torchao form.

    Returns what it was stored as, why it is no torchao tensor (None when it is one or when it
    is a plain cast) and its serialised torchao config (None unless it is a torchao tensor).
    """
    lay = members[0]
    weight = get_weight(module, lay)
    matrix = weight_matrix(weight.detach(), lay.kind)
    fmt = _row_spanning(fmt, matrix.shape[1])
    entry = torchao_config_of(fmt, lay.kind, matrix.shape[1])
    if fmt.kind == "float":
        cast = nn.Parameter(weight.detach().to(FLOAT_DTYPES[fmt.name]), requires_grad=False)
        for m in members:  # one parameter for the whole tie group keeps it tied
            module.get_submodule(m.name).weight = cast
        return str(cast.dtype).removeprefix("torch."), None, None
    if entry is not None and len(members) == 1:
        codes = _codes(matrix, fmt, rounder, lay.param)
        tensor = (
            _float8_tensor(matrix, codes) if fmt.kind == "fp8" else _intx_tensor(matrix, fmt, codes)
        )
        module.get_submodule(lay.name).weight = nn.Parameter(tensor, requires_grad=False)
        return type(tensor).__name__, None, entry
    if entry is not None:
        tied = ", ".join(m.name for m in members[1:])
        reason = f"tied to {tied}; transformers cannot tie torchao tensors"
    else:
        reason = torchao_gap(fmt, lay.kind, matrix.shape[1]) or f"torchao has no {fmt.name} form"
    with torch.no_grad():
        view = weight_matrix(weight.data, lay.kind)
        fake_quantize(view, fmt, out=view, codes=rounder.quantizer(lay.param))  # same values
    return f"dequantized {str(weight.dtype).removeprefix('torch.')}", reason, None


def _embedding_names(module: Any) -> set[str]:
    """FQNs of the input and output embeddings (they need TorchAoConfig's embedding switch)."""
    wanted = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            wanted.append(getattr(module, getter)())
        except (AttributeError, NotImplementedError):
            continue
    ids = {id(m) for m in wanted if m is not None}
    return {name for name, m in module.named_modules() if id(m) in ids}


def _torchao_config(module: Any, configs: dict[str, dict[str, Any]]) -> Any:
    """transformers' ``TorchAoConfig`` around torchao's ``FqnToConfig`` of ``configs``."""
    from transformers import TorchAoConfig

    fqn = FqnToConfig(OrderedDict((k, config_from_dict(v)) for k, v in configs.items()))
    embeddings = bool(_embedding_names(module) & set(configs)) or any(
        isinstance(module.get_submodule(name), nn.Embedding) for name in configs
    )
    return TorchAoConfig(quant_type=fqn, include_input_output_embeddings=embeddings)


def _fix_config_dtype(folder: Path, dtype: torch.dtype) -> None:
    """``save_pretrained`` records the first parameter's dtype as the model's; when a cast layer
    comes first that is the cast's, and transformers would load the whole model in it."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    want = str(dtype).removeprefix("torch.")
    if config.get("dtype") != want:
        config["dtype"] = want
        write_text_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _note(form: HfForm, stored: list[_Stored], tensor_bytes: int) -> str:
    """The note: bytes against the user's plan, per layer against the written plan's layer."""
    return json.dumps(
        {
            "schema": NOTE_SCHEMA,
            "model": form.model.ref,
            "plan_total_bytes": form.plan_total_bytes,
            "tensor_bytes": tensor_bytes,
            "extra_bytes": tensor_bytes - form.plan_total_bytes,
            "conversion": form.conversion,
            "layers": [
                {
                    "layers": list(s.layers),
                    "format": s.format,
                    "stored_as": s.stored_as,
                    "bytes": s.bytes,
                    "plan_bytes": s.plan_bytes,
                    "not_torchao_because": s.reason,
                }
                for s in stored
            ],
        },
        indent=1,
    )


def write_torchao(
    *, model: LoadedModel, plan: Plan, out_dir: Path, rounder: Rounder | None = None
) -> ArtifactReport:
    """Write ``model`` quantized per ``plan`` as a transformers + torchao folder in ``out_dir``.

    Changes a transformers ``model.module`` in place (its planned weights become torchao
    tensors); ``builtin:tiny-lm`` is written as its OPT twin and stays as it is. Refuses any
    other model, and a plan made for another model.
    """
    from transformers.quantizers.auto import AutoHfQuantizer

    form = hf_form(model, plan)
    if form is None:
        raise InputError(
            f"--to torchao writes a Hugging Face folder, and {model.ref} is not a transformers "
            "model; use --to bitplan, or the torchao export with quantize_ on your own module "
            "(of the builtin models, tiny-lm is written as a transformers OPT)"
        )
    rounder = (rounder or Rounder()).renamed(form.param_names(plan))
    model, plan, module = form.model, form.plan, form.module
    check_plan_matches(model, plan)
    dtype = module.dtype
    stored: list[_Stored] = []
    configs: dict[str, dict[str, Any]] = {}
    for members, fmt, plan_bytes in _groups(model, plan):
        stored_as, reason, entry = _store(module, members, fmt, rounder)
        if entry is not None:
            configs[members[0].name] = entry
        weight = get_weight(module, members[0])
        names = tuple(m.name for m in members)
        stored.append(_Stored(names, fmt.name, stored_as, _nbytes(weight.data), plan_bytes, reason))
    fallbacks = [s for s in stored if s.reason is not None]
    if fallbacks:
        log.warning(
            "%d planned tensor(s) have no torchao form and are stored dequantized (same values, "
            "more bytes), e.g. %s: %s; see %s",
            len(fallbacks),
            fallbacks[0].layers[0],
            fallbacks[0].reason,
            NOTE_FILE,
        )
    if configs:
        config = _torchao_config(module, configs)
        module.hf_quantizer = AutoHfQuantizer.from_config(config)
        module.config.quantization_config = config
    out_dir = Path(out_dir)
    with staged_folder(out_dir) as tmp:
        module.save_pretrained(tmp)
        _fix_config_dtype(tmp, dtype)
        if model.tokenizer is not None and hasattr(model.tokenizer, "save_pretrained"):
            model.tokenizer.save_pretrained(tmp)
        sizes: dict[str, int] = {}
        for shard in sorted(tmp.glob("*.safetensors")):
            sizes.update(tensor_sizes_of(shard))
        total = sum(sizes.values())
        plan.write(tmp / PLAN_FILE)
        write_text_atomic(tmp / NOTE_FILE, _note(form, stored, total) + "\n")
    log.info(
        "wrote %s: %d torchao layers, %d tensor bytes (plan %d)",
        out_dir,
        len(configs),
        total,
        form.plan_total_bytes,
    )
    return ArtifactReport(
        path=out_dir,
        tensor_bytes=sizes,
        total_bytes=total,
        plan_path=out_dir / PLAN_FILE,
    )
