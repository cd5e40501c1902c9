"""Exports of a plan to the tools people quantize with: CSV, torchao, llama.cpp.

* CSV: one row a layer, the plan's layer fields (``rows``/``cols`` instead of ``shape``).
* torchao: torchao's own serialised config (the ``config_to_dict`` envelope of an
  ``FqnToConfig``): module FQN -> ``IntxWeightOnlyConfig`` / ``Float8WeightOnlyConfig``, or None
  to leave a module unquantized. A consumer runs ``quantize_(model,
  config_from_dict(json.load(f)), filter_fn=None)``. The envelope is written here without
  importing torchao (an optional runtime; the service renders exports without it); the tests
  load it back with torchao. :func:`torchao_config_of` is the one table of the mapping, also
  used by ``bitplan apply --to torchao`` (:mod:`bitplan.search.runtime_torchao`). torchao
  recomputes the scales when it quantizes a float model, so this recipe approximates bitplan's
  arithmetic (``SYMMETRIC_NO_CLIPPING_ERR`` picks bitplan's scale where a group's largest
  magnitude is positive and uses the extra level -2^(b-1) elsewhere; ``ASYMMETRIC`` keeps zero
  in range); ``apply --to torchao`` stores bitplan's own codes instead and is exact. A
  quantized layer torchao has no config for (a llama.cpp block format, a Conv layer, a group
  size that does not divide the row) maps to None too, which would silently leave it in full
  precision: such layers are logged as a warning and listed with the reason under the
  envelope's ``note`` key (``config_from_dict`` reads only ``_type``/``_data``).
* llama.cpp: ``--tensor-type PATTERN=TYPE`` arguments for ``llama-quantize``, where PATTERN is
  the GGUF tensor name (escaped, it is matched as a regex). Model names map to GGUF names for
  LLaMA-style and GPT-2-style models; a llama.cpp block format (``q4_k`` …) maps to itself;
  integer widths map to the k-quant of the same width (llama.cpp picks its own block layout,
  so group size and symmetry do not carry over). A tie
  group is one GGUF tensor and appears once.

:data:`EXPORTS` is the one registry of these downloads (name, label, media type, file suffix,
exporter): the REST API's ``?format=`` choices and media types and the report's download links
and offline files all come from it, so a new export is added in one place.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from bitplan.search.plans import Plan, PlanLayer
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.format_spec import QuantFormat

__all__ = [
    "EXPORTS",
    "Export",
    "gguf_name",
    "llamacpp_args",
    "llamacpp_type",
    "plan_to_csv",
    "plan_to_llamacpp",
    "plan_to_torchao",
    "torchao_config",
    "torchao_config_of",
    "torchao_gap",
]

log = logging.getLogger(__name__)

# Formats (or layer kinds) already warned about in this process: a job's report renders the
# torchao export of every plan, and one warning per cause says it for all of them.
_WARNED: set[str] = set()

_CSV_FIELDS = (
    "name",
    "param",
    "kind",
    "rows",
    "cols",
    "numel",
    "tie",
    "format",
    "rounding",
    "bits",
    "group_size",
    "symmetric",
    "bytes",
)


def plan_to_csv(plan: Plan) -> str:
    """The plan's layers, one CSV row each."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=_CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for lay in plan.layers:
        rows, cols = lay.shape if lay.shape is not None else ("", "")
        writer.writerow(
            {
                "name": lay.name,
                "param": lay.param,
                "kind": lay.kind or "",
                "rows": rows,
                "cols": cols,
                "numel": lay.numel,
                "tie": lay.tie or "",
                "format": lay.format.base_name,
                "rounding": lay.rounding,
                "bits": lay.bits,
                "group_size": lay.group_size or "",
                "symmetric": lay.symmetric,
                "bytes": lay.bytes,
            }
        )
    return out.getvalue()


# ``_version`` of each class in torchao's envelope (``config_to_dict`` writes the class's
# ``version``; ``config_from_dict`` warns when it differs from the installed torchao's).
_TORCHAO_VERSIONS = {
    "FqnToConfig": 1,
    "IntxWeightOnlyConfig": 2,
    "Float8WeightOnlyConfig": 2,
    "PerGroup": 1,
    "PerAxis": 1,
}
# Module kinds whose weight torchao's weight-only configs quantize as bitplan's [rows, cols]
# matrix. Conv weights are grouped per input channel by torchao but along the flattened
# (in·k…) axis by bitplan, and transformers' Conv1D stores [in, out]: no torchao equivalent.
_TORCHAO_KINDS = (None, "linear", "embedding")


def _ao(type_name: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"_type": type_name, "_version": _TORCHAO_VERSIONS[type_name], "_data": data}


def _ao_plain(type_name: str, value: str) -> dict[str, str]:
    """A torch dtype or an enum member in torchao's envelope."""
    return {"_type": type_name, "_data": value}


def torchao_config_of(
    fmt: QuantFormat, kind: str | None, cols: int | None = None
) -> dict[str, Any] | None:
    """torchao's serialised per-module config for one format, or None: "leave unquantized".

    The one table of the torchao mapping. ``int{b}[-gG][-asym]`` -> ``IntxWeightOnlyConfig``
    (int{b}, ``PerGroup(G)`` or ``PerAxis(0)``, float16 scales as bitplan stores them);
    ``fp8-e4m3`` -> ``Float8WeightOnlyConfig`` (per row). None for plain casts, for layers that
    are no Linear or Embedding, for a group size that does not divide ``cols`` (torchao needs
    whole blocks; bitplan allows a short last group) and for formats torchao has no config for.
    """
    if kind not in _TORCHAO_KINDS:
        return None
    if fmt.kind == "fp8":
        return _ao("Float8WeightOnlyConfig", {})
    if fmt.kind != "int":
        return None
    if fmt.group_size is not None and cols is not None and cols % fmt.group_size:
        return None
    if fmt.group_size is None:
        granularity = _ao("PerAxis", {"axis": 0})
    else:
        granularity = _ao("PerGroup", {"group_size": fmt.group_size})
    mapping = "SYMMETRIC_NO_CLIPPING_ERR" if fmt.symmetric else "ASYMMETRIC"
    return _ao(
        "IntxWeightOnlyConfig",
        {
            "weight_dtype": _ao_plain("torch.dtype", f"int{fmt.bits}"),
            "granularity": granularity,
            "mapping_type": _ao_plain("MappingType", mapping),
            "scale_dtype": _ao_plain("torch.dtype", "float16"),
        },
    )


def torchao_gap(fmt: QuantFormat, kind: str | None, cols: int | None = None) -> str | None:
    """Why a quantized ``fmt`` has no torchao config for this layer (see
    :func:`torchao_config_of`); None when it has one, or when ``fmt`` is a plain float cast."""
    if not fmt.is_quantized or torchao_config_of(fmt, kind, cols) is not None:
        return None
    if fmt.kind == "ggml":
        return f"{fmt.name} is a llama.cpp block format, which torchao has no config for"
    if kind not in _TORCHAO_KINDS:
        return f"torchao's weight-only configs group a {kind} layer's weights unlike bitplan"
    if fmt.kind == "int" and fmt.group_size is not None and cols is not None:
        return f"group size {fmt.group_size} does not divide the row length {cols}"
    return f"torchao has no config for {fmt.name}"


def torchao_config(plan: Plan) -> dict[str, Any]:
    """The plan as torchao's serialised ``FqnToConfig`` (``config_from_dict`` reads it).

    Quantized layers without a torchao equivalent map to None like float casts, are logged
    (once per format and layer kind in a process), and are listed with the reason in the
    envelope's ``note``
    (``{"summary": ..., "layers": {name: reason}}``), present only when there are any.
    """
    mapping: dict[str, dict[str, Any] | None] = {}
    gaps: dict[str, str] = {}
    for lay in plan.layers:
        cols = None if lay.shape is None else lay.shape[1]
        mapping[lay.name] = torchao_config_of(lay.format, lay.kind, cols)
        gap = torchao_gap(lay.format, lay.kind, cols)
        if gap is not None:
            gaps[lay.name] = gap
            cause = f"{lay.format.name} {lay.kind}"
            if cause not in _WARNED:
                _WARNED.add(cause)
                log.warning(
                    "the torchao export maps %s to null (torchao leaves it in full precision): "
                    "%s; the export's 'note' lists every such layer",
                    lay.name,
                    gap,
                )
    envelope = _ao("FqnToConfig", {"fqn_to_config": mapping})
    note: dict[str, Any] = {}
    if gaps:
        summary = (
            f"{len(gaps)} quantized layer(s) have no torchao equivalent and map to null, so "
            "torchao leaves them in full precision"
        )
        note = {"summary": summary, "layers": gaps}
    rounded = {lay.name: lay.rounding for lay in plan.layers if lay.rounding != "rtn"}
    if rounded:  # a config can only say "quantize": torchao then rounds to nearest itself
        note["rounding"] = {
            "summary": f"{len(rounded)} layer(s) were planned with another rounding than "
            "round-to-nearest, which quantize_ applies; `bitplan apply --to torchao` writes "
            "their rounded integers",
            "layers": rounded,
        }
    if note:
        envelope["note"] = note
    return envelope


def plan_to_torchao(plan: Plan) -> str:
    """:func:`torchao_config` as JSON text."""
    return json.dumps(torchao_config(plan), indent=1) + "\n"


# Model module name -> GGUF tensor name (without ".weight"); {n} is the block number.
_GGUF_NAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), name)
    for pattern, name in (
        # LLaMA-style (Llama, Mistral, Qwen2, ...)
        (r"(?:^|\.)layers\.(\d+)\.self_attn\.q_proj$", "blk.{n}.attn_q"),
        (r"(?:^|\.)layers\.(\d+)\.self_attn\.k_proj$", "blk.{n}.attn_k"),
        (r"(?:^|\.)layers\.(\d+)\.self_attn\.v_proj$", "blk.{n}.attn_v"),
        (r"(?:^|\.)layers\.(\d+)\.self_attn\.o_proj$", "blk.{n}.attn_output"),
        (r"(?:^|\.)layers\.(\d+)\.mlp\.gate_proj$", "blk.{n}.ffn_gate"),
        (r"(?:^|\.)layers\.(\d+)\.mlp\.up_proj$", "blk.{n}.ffn_up"),
        (r"(?:^|\.)layers\.(\d+)\.mlp\.down_proj$", "blk.{n}.ffn_down"),
        (r"(?:^|\.)embed_tokens$", "token_embd"),
        (r"^lm_head$", "output"),
        # GPT-2-style
        (r"(?:^|\.)h\.(\d+)\.attn\.c_attn$", "blk.{n}.attn_qkv"),
        (r"(?:^|\.)h\.(\d+)\.attn\.c_proj$", "blk.{n}.attn_output"),
        (r"(?:^|\.)h\.(\d+)\.mlp\.c_fc$", "blk.{n}.ffn_up"),
        (r"(?:^|\.)h\.(\d+)\.mlp\.c_proj$", "blk.{n}.ffn_down"),
        (r"(?:^|\.)wte$", "token_embd"),
        (r"(?:^|\.)wpe$", "position_embd"),
    )
)

# bitplan integer width -> the llama.cpp type of that width; plain floats map to themselves.
_GGML_INT = {8: "q8_0", 6: "q6_K", 5: "q5_K", 4: "q4_K", 3: "q3_K", 2: "q2_K"}
_GGML_FLOAT = {"fp16": "f16", "bf16": "bf16", "fp32": "f32"}


def gguf_name(module: str) -> str | None:
    """The GGUF tensor name of a module (``model.layers.3.mlp.up_proj`` -> ``blk.3.ffn_up``)."""
    for pattern, name in _GGUF_NAMES:
        match = pattern.search(module)
        if match is not None:
            return name.format(n=match.group(1)) if match.groups() else name
    return None


def llamacpp_type(fmt: QuantFormat) -> str:
    """The llama.cpp type for a format; fp8 has none. A llama.cpp block format is itself."""
    if fmt.ggml is not None:
        return fmt.ggml.ggml_name
    if fmt.kind == "float":
        return _GGML_FLOAT[fmt.name]
    if fmt.kind == "fp8":
        raise InputError(
            f"llama.cpp has no {fmt.name} type; pick a plan without fp8 layers "
            "or use the torchao export"
        )
    return _GGML_INT[fmt.bits]


def _one_per_tensor(plan: Plan) -> list[tuple[PlanLayer, str]]:
    """(layer, GGUF name) per stored tensor; a tie group is one tensor, named after its
    embedding when it has one (GGUF stores a tied output matrix as token_embd)."""
    chosen: dict[str, tuple[PlanLayer, str]] = {}
    for lay in plan.layers:
        name = gguf_name(lay.name)
        if name is None:
            raise InputError(
                f"cannot name tensor {lay.name} in GGUF: the llama.cpp export "
                "knows LLaMA-style and GPT-2-style module names only"
            )
        if lay.tensor_key not in chosen or name == "token_embd":
            chosen[lay.tensor_key] = (lay, name)
    return list(chosen.values())


def llamacpp_args(plan: Plan) -> list[str]:
    """``["--tensor-type", "blk\\.0\\.attn_q\\.weight=q4_K", ...]`` for ``llama-quantize``."""
    args = []
    for lay, name in _one_per_tensor(plan):
        ggml = llamacpp_type(lay.format)
        args += ["--tensor-type", f"{re.escape(name + '.weight')}={ggml}"]
    return args


def plan_to_llamacpp(plan: Plan) -> str:
    """The arguments as shell text, one ``--tensor-type`` a line."""
    args = llamacpp_args(plan)
    pairs = [shlex.join(args[i : i + 2]) for i in range(0, len(args), 2)]
    return " \\\n".join(pairs) + "\n"


@dataclass(frozen=True)
class Export:
    """One download of a plan.

    ``name`` is the API's ``?format=`` value, ``label`` what a person reads, ``description``
    what it holds (the API documents it), ``media_type`` the HTTP content type, ``suffix`` the
    file name's ending after the plan id (offline report). ``render`` makes the text from a plan,
    raising :class:`InputError` when the plan has no such export (llama.cpp names few models);
    None means the export is the plan file itself.
    """

    name: str
    label: str
    description: str
    media_type: str
    suffix: str
    render: Callable[[Plan], str] | None


EXPORTS: Final[dict[str, Export]] = {
    export.name: export
    for export in (
        Export("json", "JSON", "the plan file", "application/json", ".json", None),
        Export("csv", "CSV", "one row a layer", "text/csv", ".csv", plan_to_csv),
        Export(
            "torchao",
            "torchao",
            "torchao's serialised FqnToConfig (torchao.core.config.config_from_dict)",
            "application/json",
            ".torchao.json",
            plan_to_torchao,
        ),
        Export(
            "llamacpp",
            "llama.cpp",
            "--tensor-type arguments",
            "text/plain",
            ".llamacpp.txt",
            plan_to_llamacpp,
        ),
    )
}
