"""``bitplan apply --to gguf``: one GGUF file that llama.cpp loads, with the plan's exact bytes.

Every planned tensor is stored in its plan format: a llama.cpp block format (``q8_0`` …
``q2_k``) as the ggml block bytes bitplan computed (:func:`~bitplan.sensitivity.ggml_blocks.
quantize_blocks`, bit-identical to ggml's reference quantizers), so llama.cpp multiplies by
exactly the weights bitplan measured; ``fp16``/``bf16``/``fp32`` as that float type. So the
planned tensors' data in the file is exactly the plan's ``planned_bytes``. bitplan's own
``int{b}-g{G}`` and ``fp8-e4m3`` formats have no GGUF type and are refused (search with
llama.cpp's formats, or export ``--tensor-type`` arguments for ``llama-quantize`` instead).

Besides the planned tensors the file holds (:class:`GgufReport` counts each part):

- the header: magic, version, metadata (architecture hyperparameters, the tokenizer of
  :mod:`bitplan.search.runtime_gguf_vocab`) and one info record per tensor;
- the other parameters (norms, biases) in f32, as llama.cpp's converter stores 1-D tensors,
  and any weight the plan leaves out at its stored float type; the plan counts these at their
  stored dtype, so a bf16 model's norms take twice the plan's bytes here;
- zero padding that aligns every tensor's data to 32 bytes (``general.alignment``).

Which tensors an architecture needs, and how fused or permuted rows map to the model's
parameters, is :mod:`bitplan.search.runtime_gguf_arch`. The writer streams: it writes the
header from shapes and formats, then one tensor at a time (quantized when it is written), so
memory holds one tensor's values and bytes, never the model twice. The file appears under its
name only once complete (written beside it, synced, renamed); a failure leaves nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch

from bitplan.search.artifact import ArtifactReport
from bitplan.search.plans import Plan, PlanLayer
from bitplan.search.runtime_gguf_arch import GgufTensor, gguf_layout, tensor_values, weight_kinds
from bitplan.search.runtime_gguf_vocab import add_vocab
from bitplan.search.targets import check_plan_matches, name_list
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.format_spec import QuantFormat, tensor_bytes
from bitplan.sensitivity.ggml_blocks import quantize_blocks
from bitplan.sensitivity.layers import LayerKind, weight_matrix

if TYPE_CHECKING:
    from bitplan.sensitivity.models import LoadedModel
    from bitplan.sensitivity.rounder import Rounder

__all__ = ["GGUF_FILE", "GgufReport", "write_gguf", "write_gguf_target"]

log = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"
# GGUF stores these float types as they are; any other dtype is written as f32.
_FLOAT_TYPES = {
    torch.float32: gguf.GGMLQuantizationType.F32,
    torch.float16: gguf.GGMLQuantizationType.F16,
    torch.bfloat16: gguf.GGMLQuantizationType.BF16,
}
_PLAN_FLOATS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class GgufReport(ArtifactReport):
    """What :func:`write_gguf` wrote: ``path`` is the ``model.gguf`` file, ``tensor_bytes``
    each GGUF tensor's data bytes by its GGUF name, ``plan_path`` None (the file is all there
    is). ``total_bytes`` = tensor data = ``planned_bytes`` + ``unplanned_bytes``;
    ``file_bytes`` = that + ``header_bytes`` + ``padding_bytes``.

    ``planned_bytes`` equals the plan's; ``unplanned_bytes`` are the other tensors as stored
    here (f32 norms and biases), to compare with the plan's ``plan_unplanned_bytes`` (the same
    parameters at their stored dtype). ``vocab`` says which tokenizer went in (see
    :mod:`bitplan.search.runtime_gguf_vocab`).
    """

    architecture: str
    vocab: str
    planned_bytes: int
    unplanned_bytes: int
    plan_unplanned_bytes: int
    header_bytes: int
    padding_bytes: int
    file_bytes: int


@dataclass(frozen=True)
class _Stored:
    """One GGUF tensor as it is written: its type, shape ``[rows, cols]`` or ``[n]``, bytes."""

    tensor: GgufTensor
    fmt: QuantFormat | None  # None: not planned, stored as ``dtype``
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int

    @property
    def ggml_type(self) -> gguf.GGMLQuantizationType:
        t = self.fmt.ggml if self.fmt is not None else None
        return gguf.GGMLQuantizationType(t.type_id) if t is not None else _FLOAT_TYPES[self.dtype]


def _shape(
    params: Mapping[str, torch.Tensor], tensor: GgufTensor, kinds: Mapping[str, LayerKind]
) -> tuple[int, ...]:
    """The stored shape: the sources' rows added up (a weight as its ``[rows, cols]`` matrix)."""
    shapes = [
        tuple(weight_matrix(params[src], kinds[src]).shape if src in kinds else params[src].shape)
        for src in tensor.sources
    ]
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def _refuse_foreign_formats(plan: Plan) -> None:
    """bitplan's own int/fp8 formats have no GGUF type: one error naming the layers."""
    foreign = [
        f"{lay.name} ({lay.format.name})"
        for lay in plan.layers
        if lay.format.kind in ("int", "fp8")
    ]
    if foreign:
        raise InputError(
            f"layers {name_list(foreign)} use bitplan formats that GGUF cannot store; search "
            "with llama.cpp's formats (--formats q8_0,q6_k,q5_k,q4_k,q3_k,q2_k,fp16) or "
            "export the plan's --tensor-type arguments for llama-quantize"
        )


def _format_of(tensor: GgufTensor, planned: Mapping[str, list[PlanLayer]]) -> QuantFormat | None:
    """The plan's one format for a GGUF tensor; None when none of its sources is planned.

    ``planned`` maps parameter names to the plan's layers of that weight (a tie group's all).
    """
    layers = [lay for src in tensor.sources for lay in planned.get(src, [])]
    if not layers:
        return None
    unplanned = [src for src in tensor.sources if src not in planned]
    if unplanned or len({lay.format.name for lay in layers}) > 1:
        listed = [f"{lay.name} ({lay.format.name})" for lay in layers]
        listed += [f"{src} (not planned)" for src in unplanned]
        raise InputError(
            f"llama.cpp stores {', '.join(tensor.sources)} as one tensor {tensor.name} in one "
            f"format, but the plan has {', '.join(listed)}; search with --fuse qkv so these "
            "layers share one format"
        )
    return layers[0].format


def _stored(model: LoadedModel, plan: Plan, tensors: list[GgufTensor]) -> list[_Stored]:
    """Every tensor's type, shape and bytes, checked against the plan before anything is written."""
    params = dict(model.module.named_parameters())
    kinds = weight_kinds(model.module)
    planned_params: dict[str, list[PlanLayer]] = {}
    for lay in plan.layers:
        planned_params.setdefault(lay.param, []).append(lay)
    covered = {src for t in tensors for src in t.sources}
    missing = [lay.name for lay in plan.layers if lay.param not in covered]
    if missing:
        raise InputError(
            f"the GGUF layout has no tensor for the plan's layers {name_list(missing)}"
        )
    out = []
    for t in tensors:
        fmt = _format_of(t, planned_params)
        shape = _shape(params, t, kinds)
        if fmt is not None:
            dtype = _PLAN_FLOATS.get(fmt.name, torch.uint8)
            nbytes = tensor_bytes(fmt, shape[0], shape[1])
        else:
            stored = params[t.sources[0]].dtype
            dtype = stored if len(shape) == 2 and stored in _FLOAT_TYPES else torch.float32
            nbytes = int(np.prod(shape)) * dtype.itemsize
        out.append(_Stored(t, fmt, dtype, shape, nbytes))
    planned = sum(s.nbytes for s in out if s.fmt is not None)
    if planned != plan.totals.planned_bytes:
        raise InputError(
            f"the plan's planned tensors take {plan.totals.planned_bytes} bytes but their GGUF "
            f"tensors {planned}; apply the plan to the model it was made for"
        )
    return out


def _encode(values: torch.Tensor, s: _Stored) -> np.ndarray[Any, Any]:
    """The tensor's bytes as gguf-py writes them: a float array, or uint8 rows of a raw type."""
    if s.fmt is not None and s.fmt.ggml is not None:
        return quantize_blocks(values, s.fmt).numpy()  # (rows, cols/block · type_size)
    cast = values.to(s.dtype).contiguous()
    if s.dtype == torch.bfloat16:  # numpy has no bfloat16: its raw bytes
        return cast.view(torch.uint8).numpy()  # (rows, 2·cols)
    return cast.numpy()


def _add_info(w: gguf.GGUFWriter, s: _Stored) -> None:
    raw = s.ggml_type
    if raw in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        np_dtype = np.float32 if raw == gguf.GGMLQuantizationType.F32 else np.float16
        w.add_tensor_info(s.tensor.name, s.shape, np.dtype(np_dtype), s.nbytes)
        return
    byte_shape = (*s.shape[:-1], s.nbytes // max(1, int(np.prod(s.shape[:-1]))))
    w.add_tensor_info(s.tensor.name, byte_shape, np.dtype(np.uint8), s.nbytes, raw_dtype=raw)


def write_gguf(*, model: LoadedModel, plan: Plan, out_path: Path) -> GgufReport:
    """Write ``model`` quantized per ``plan`` as one GGUF file at ``out_path``.

    Refuses (``InputError``, nothing written) a plan made for other weights, layers in bitplan's
    own int/fp8 formats, layers llama.cpp stores as one tensor (GPT-2's q/k/v) in different
    formats, and architectures llama.cpp cannot be given (see the module docstring).
    """
    out_path = Path(out_path)
    check_plan_matches(model, plan)
    _refuse_foreign_formats(plan)
    layout = gguf_layout(model.module)
    stored = _stored(model, plan, layout.tensors)
    writer = gguf.GGUFWriter(path=None, arch=layout.arch)
    writer.add_name(
        model.ref.removeprefix("builtin:")
        if model.ref.startswith("builtin:")
        else Path(model.ref).name
    )
    writer.add_quantized_by("bitplan")
    layout.add_hparams(writer)
    config = getattr(model.module, "config", None)
    vocab = add_vocab(
        writer,
        tokenizer=model.tokenizer,
        model_type=getattr(config, "model_type", None),
        vocab_size=layout.vocab_size,
    )
    for s in stored:
        _add_info(writer, s)
    params = dict(model.module.named_parameters())
    kinds = weight_kinds(model.module)
    partial = out_path.with_name(f".{out_path.name}.partial")  # never a plausible half file
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None  # opened by write_header_to_file
        header = writer.fout[0].tell()
        with torch.no_grad():
            for s in stored:
                writer.write_tensor_data(_encode(tensor_values(params, s.tensor, kinds), s))
        writer.flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        os.replace(partial, out_path)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    sizes = {s.tensor.name: s.nbytes for s in stored}
    planned = sum(s.nbytes for s in stored if s.fmt is not None)
    data = sum(sizes.values())
    file_bytes = out_path.stat().st_size
    log.info("wrote %s: %s, %d tensors, %d tensor bytes", out_path, layout.arch, len(sizes), data)
    return GgufReport(
        path=out_path,
        tensor_bytes=sizes,
        total_bytes=data,
        plan_path=None,
        architecture=layout.arch,
        vocab=vocab,
        planned_bytes=planned,
        unplanned_bytes=data - planned,
        plan_unplanned_bytes=plan.totals.unplanned_bytes,
        header_bytes=header,
        padding_bytes=file_bytes - header - data,
        file_bytes=file_bytes,
    )


def write_gguf_target(
    *, model: LoadedModel, plan: Plan, out_dir: Path, rounder: Rounder | None = None
) -> GgufReport:
    """``bitplan apply --to gguf``: :func:`write_gguf` into ``out_dir/model.gguf``.

    ``rounder`` goes unused: llama.cpp's block formats (and the float casts) are rounded to
    nearest only, so a plan for this target has no other rounding."""
    del rounder
    return write_gguf(model=model, plan=plan, out_path=Path(out_dir) / GGUF_FILE)
