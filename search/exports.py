"""Exports of a plan to the tools people quantize with: CSV, torchao, llama.cpp.

* CSV: one row a layer, the plan's layer fields (``rows``/``cols`` instead of ``shape``).
* torchao: an ``FqnToConfig`` mapping module FQN -> weight-only config, as a JSON-ready dict and
  as Python source. torchao is not a dependency: the mapping lives in one table,
  :func:`torchao_config_of`, and the code text is generated from it. Plain-float layers map to
  ``None`` (FqnToConfig leaves them unquantized).
* llama.cpp: ``--tensor-type PATTERN=TYPE`` arguments for ``llama-quantize``, where PATTERN is
  the GGUF tensor name (escaped, it is matched as a regex). Model names map to GGUF names for
  LLaMA-style and GPT-2-style models; integer widths map to the k-quant of the same width
  (llama.cpp picks its own block layout, so group size and symmetry do not carry over). A tie
  group is one GGUF tensor and appears once.

:data:`EXPORTS` is the one registry of these downloads (name, label, media type, file suffix,
exporter): the REST API's ``?format=`` choices and media types and the report's download links
and offline files all come from it, so a new export is added in one place.
"""

from __future__ import annotations

import csv
import io
import json
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
    "torchao_code",
    "torchao_config",
    "torchao_config_of",
]

_CSV_FIELDS = (
    "name",
    "param",
    "kind",
    "rows",
    "cols",
    "numel",
    "tie",
    "format",
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
                "format": lay.format.name,
                "bits": lay.bits,
                "group_size": lay.group_size or "",
                "symmetric": lay.symmetric,
                "bytes": lay.bytes,
            }
        )
    return out.getvalue()


# torchao's Int4WeightOnlyConfig kernels (tinygemm) take these group sizes only.
_INT4_GROUPS = (32, 64, 128, 256)


def torchao_config_of(fmt: QuantFormat, kind: str | None) -> tuple[str, dict[str, str]] | None:
    """The torchao config class and its keyword arguments (as source text) for one format.

    The one table of the torchao mapping; None means "leave unquantized".
    """
    if fmt.kind == "float":
        return None
    if fmt.kind == "fp8":
        return "Float8WeightOnlyConfig", {}
    linear = kind in (None, "linear")  # the Int4/Int8 kernels are Linear-only
    if linear and fmt.bits == 8 and fmt.group_size is None and fmt.symmetric:
        return "Int8WeightOnlyConfig", {}
    if linear and fmt.bits == 4 and fmt.group_size in _INT4_GROUPS and fmt.symmetric:
        return "Int4WeightOnlyConfig", {"group_size": str(fmt.group_size)}
    granularity = f"PerGroup({fmt.group_size})" if fmt.group_size else "PerAxis(0)"
    mapping = "MappingType.SYMMETRIC" if fmt.symmetric else "MappingType.ASYMMETRIC"
    return "IntxWeightOnlyConfig", {
        "weight_dtype": f"torch.int{fmt.bits}",
        "granularity": granularity,
        "mapping_type": mapping,
    }


def torchao_config(plan: Plan) -> dict[str, dict[str, Any] | None]:
    """``{module FQN: {"config": class name, "kwargs": {...}} or None}``."""
    result: dict[str, dict[str, Any] | None] = {}
    for lay in plan.layers:
        entry = torchao_config_of(lay.format, lay.kind)
        result[lay.name] = None if entry is None else {"config": entry[0], "kwargs": entry[1]}
    return result


def torchao_code(plan: Plan) -> str:
    """Python source that builds the plan's ``FqnToConfig`` and applies it with ``quantize_``."""
    mapping = torchao_config(plan)
    classes = sorted({e["config"] for e in mapping.values() if e is not None})
    lines = [
        "import torch",
        "from torchao.quantization import FqnToConfig, quantize_"
        + "".join(f", {c}" for c in classes),
        "from torchao.quantization.granularity import PerAxis, PerGroup",
        "from torchao.quantization.quant_primitives import MappingType",
        "",
        f"# bitplan plan for {plan.model_ref}: {plan.totals.bpw:.3f} bpw, "
        f"{plan.totals.total_bytes} bytes",
        "config = FqnToConfig({",
    ]
    for fqn, entry in mapping.items():
        if entry is None:
            value = "None"
        else:
            kwargs = ", ".join(f"{k}={v}" for k, v in entry["kwargs"].items())
            value = f"{entry['config']}({kwargs})"
        lines.append(f"    {fqn!r}: {value},")
    lines += ["})", "quantize_(model, config, filter_fn=None)", ""]
    return "\n".join(lines)


def plan_to_torchao(plan: Plan) -> str:
    """JSON text holding both forms: ``{"fqn_to_config": {...}, "code": "..."}``."""
    return (
        json.dumps({"fqn_to_config": torchao_config(plan), "code": torchao_code(plan)}, indent=1)
        + "\n"
    )


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
    """The llama.cpp type for a format; fp8 has none."""
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
        if lay.group not in chosen or name == "token_embd":
            chosen[lay.group] = (lay, name)
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
            "an FqnToConfig map",
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
