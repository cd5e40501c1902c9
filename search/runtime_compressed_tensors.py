"""``--to compressed-tensors``: a plan written as a checkpoint vLLM and transformers load.

The output is a Hugging Face folder (``config.json`` with a compressed-tensors
``quantization_config``, safetensors shards, tokenizer, ``plan.json``) in the layout the
``compressed-tensors`` package reads. Which scheme stores each layer, and which plans are refused,
is :mod:`bitplan.search.runtime_compressed_tensors_schemes`'s business; this module writes it.

Every quantized layer goes through compressed-tensors' own compressor (``pack-quantized``:
``weight_packed`` int32 ``[rows, ceil(cols·b/32)]``, ``weight_scale``, ``weight_shape``,
``weight_zero_point`` packed along rows for asymmetric formats; ``float-quantized``: an e4m3
``weight`` and ``weight_scale``), so the layout is the package's by construction. The compressor
is fed bitplan's dequantized weights ``ŵ = (q − zp)·scale`` with bitplan's own scales and zero
points; since ``ŵ/scale`` is exactly ``q − zp``, it recovers bitplan's codes exactly, and each
layer is decompressed again with the package's own code and checked equal to ``ŵ`` before it
is written. compressed-tensors keeps codes signed (int4: −8…7); bitplan's symmetric codes
(−7…7) fit as they are, and asymmetric codes and zero points (0…2^b−1) are stored offset by
``2^(b−1)``, which leaves ``q − zp`` unchanged.

Scales: compressed-tensors keeps them in the model's dtype and dequantizes in that dtype. An fp32
model's fp32 scales hold bitplan's fp16 scales exactly; an fp16 model's fp16 product is bitplan's
weight rounded once to fp16, as bitplan's own fake-quantized fp16 model has it. bf16 cannot hold
bitplan's scales, so a bf16 model's scales are stored in fp32 and compressed-tensors'
decompression still gives bitplan's weights exactly; runtimes that keep a bf16 model's scales in
bf16 (transformers, vLLM) round each scale when they load it (at most 2^-9 relative; a warning
says so).

Bytes: compressed-tensors pads each packed row to whole int32 words, pads zero points likewise,
stores a ``weight_shape`` per packed layer and, but for fp16 models, 4-byte scales. The report (an
:class:`~bitplan.search.artifact.ArtifactReport` whose ``path`` is the folder) gives the tensor
bytes written, the plan's ``total_bytes`` and the difference by cause, which add up exactly.

Loading: transformers' ``from_pretrained`` reads the folder (compressed-tensors decompresses each
layer with its own scheme on the first forward pass), and so does compressed-tensors' model-free
``CompressedTensorsDequantizer``. Two limits of the loaders, not of the files: transformers'
``dequantize=True`` path assumes one scheme for every dense layer, which a mixed plan is not; and
transformers 5 with compressed-tensors 0.20 builds the zero points of asymmetric layers unpacked
on the meta device, so it refuses asymmetric ``pack-quantized`` layers (the model-free
dequantizer reads them exactly).

``builtin:tiny-lm`` is written as its transformers twin, an ``OPTForCausalLM`` with the same
weights and logits, plus a byte-level tokenizer with the builtin model's ids
(:mod:`bitplan.search.builtin_hf`); the plan is renamed to the twin's modules
(:mod:`bitplan.search.hf_form`) and ``plan.json`` in the folder is that renamed plan. The twin's
position table has OPT's two leading rows, which the report counts as one more cause of extra
bytes, ``opt_position_rows``. vLLM serves OPT and fuses its q/k/v like LLaMA's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
)
from safetensors.torch import save_file
from torch import nn

from bitplan.search.artifact import PLAN_FILE, ArtifactReport
from bitplan.search.hf_folder import staged_folder
from bitplan.search.hf_form import hf_form
from bitplan.search.plans import Plan
from bitplan.search.runtime_compressed_tensors_schemes import (
    LayerScheme,
    check_fused,
    layer_schemes,
)
from bitplan.search.targets import check_model_hash
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import FLOAT_DTYPES, dequantize
from bitplan.sensitivity.progress import ProgressFn, report
from bitplan.sensitivity.rounder import Rounder

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from bitplan.sensitivity.models import LoadedModel

__all__ = ["CompressedTensorsReport", "write_compressed_tensors"]

log = logging.getLogger(__name__)

# Tensors are written in shards of about this many bytes, so memory holds one shard (plus the
# layer being compressed) however large the model; every Hugging Face loader reads shards.
_SHARD_BYTES = 2 << 30
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
# The bytes a stored scale has in bitplan's accounting (DESIGN §3: scales are fp16).
_PLAN_SCALE_BYTES = 2


@dataclass(frozen=True)
class CompressedTensorsReport(ArtifactReport):
    """What :func:`write_compressed_tensors` wrote: ``path`` is the folder (what
    ``from_pretrained`` opens), ``tensor_bytes`` each stored tensor's data bytes, ``plan_path``
    the plan's copy in it.

    ``total_bytes`` is the data bytes of every tensor in ``files`` (file headers excluded);
    ``plan_bytes`` the plan's ``total_bytes``; ``extra_bytes`` the difference by cause
    (``packing``: int32 word padding of packed codes and zero points; ``scales``: scales wider
    than fp16; ``shapes``: ``weight_shape`` tensors; ``buffers``: persistent buffers, which are
    no parameters; ``opt_position_rows``, only for ``builtin:tiny-lm``: the two rows its OPT
    twin's position table has in front), so ``total_bytes == plan_bytes +
    sum(extra_bytes.values())``.
    ``config_groups`` maps each config group to the modules it targets; ``ignored`` lists the
    linear layers left unquantized.
    """

    files: tuple[Path, ...]
    plan_bytes: int
    extra_bytes: dict[str, int]
    config_groups: dict[str, tuple[str, ...]]
    ignored: tuple[str, ...]


def _check_plan(model: LoadedModel, module: nn.Module, plan: Plan) -> None:
    """The plan must be for this model: same weights, same layers and shapes, same exclusions."""
    check_model_hash(model, plan)
    planned = set()
    for lay in plan.layers:
        try:
            weight = getattr(module.get_submodule(lay.name), "weight", None)
        except AttributeError:
            weight = None
        if not isinstance(weight, torch.Tensor):
            raise InputError(f"the plan names layer {lay.name}, which this model has not")
        # a Linear's matrix is its weight; other kinds are compared by size (their view varies)
        same = (
            tuple(weight.shape) == lay.shape
            if lay.kind == "linear" and lay.shape is not None
            else weight.numel() == lay.numel
        )
        if not same:
            raise InputError(
                f"{lay.name} has {weight.numel()} weights of shape {list(weight.shape)} in the "
                f"model but {lay.numel} of shape {lay.shape} in the plan; apply the plan to the "
                "model it was made for"
            )
        planned.add(id(weight))
    unplanned = sum(
        p.numel() * p.element_size() for p in module.parameters() if id(p) not in planned
    )
    if unplanned != plan.totals.unplanned_bytes:
        raise InputError(
            f"the plan counts {plan.totals.unplanned_bytes} unplanned bytes but this model has "
            f"{unplanned}; was it made with other --exclude patterns?"
        )


def _scale_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """fp16 models keep fp16 scales; others get fp32, which holds bitplan's fp16 scales exactly."""
    return torch.float16 if weight_dtype == torch.float16 else torch.float32


def _compress(
    weight: torch.Tensor, scheme: LayerScheme, rounder: Rounder
) -> dict[str, torch.Tensor]:
    """The compressed tensors of one linear weight ``[out, in]`` (local names), checked exact;
    its codes rounded as the plan says."""
    fmt = scheme.layer.format
    codes = rounder.codes(scheme.layer.param, weight, fmt)
    w_hat = dequantize(codes, fmt, weight.shape[1]).cpu()  # (rows, cols) float32: bitplan's
    state = {"weight": w_hat, "weight_scale": codes.scale.to(_scale_dtype(weight.dtype)).cpu()}
    if codes.zero is not None:  # signed storage, offset by 2^(b-1) like the codes
        state["weight_zero_point"] = (codes.zero - (1 << (fmt.bits - 1))).to(torch.int8).cpu()
    ct_scheme = QuantizationScheme(
        targets=[scheme.layer.name], weights=scheme.weights, format=scheme.compression
    )
    compressor = BaseCompressor.get_value_from_registry(scheme.compression.value)
    packed: dict[str, torch.Tensor] = compressor.compress(state, ct_scheme)
    back = compressor.decompress(packed, ct_scheme)["weight"]
    if not torch.equal(back, w_hat.to(back.dtype)):
        raise RuntimeError(
            f"compressed-tensors does not decompress {scheme.layer.name} ({fmt.name}) to "
            "bitplan's weights; this compressed-tensors version's arithmetic differs"
        )
    return {k: v.contiguous() for k, v in packed.items()}


def _extras(stored: Mapping[str, torch.Tensor], plan_bytes: int) -> dict[str, int]:
    """A quantized layer's bytes beyond the plan's, by cause (see the report)."""
    scale = stored["weight_scale"]
    shape = stored.get("weight_shape")
    extra = {
        "scales": scale.nbytes - _PLAN_SCALE_BYTES * scale.numel(),
        "shapes": 0 if shape is None else shape.nbytes,
    }
    extra["packing"] = sum(t.nbytes for t in stored.values()) - plan_bytes - sum(extra.values())
    return extra


class _Shards:
    """Tensors written as safetensors shards of about ``_SHARD_BYTES``, named like transformers'."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.sizes: dict[str, int] = {}  # every tensor's data bytes, by name

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.pending and self.pending_bytes + tensor.nbytes > _SHARD_BYTES:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += tensor.nbytes
        self.sizes[name] = tensor.nbytes

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self.written)}.partial"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Name the shards as transformers does (with an index when there are several)."""
        if self.pending or not self.written:
            self._flush()
        n = len(self.written)
        if n == 1:
            self.written[0][0].rename(self.folder / _SINGLE_FILE)
            return [_SINGLE_FILE]
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (path, keys), name in zip(self.written, names, strict=True):
            path.rename(self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / _INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return names


def _write_tensors(
    folder: Path,
    module: nn.Module,
    plan: Plan,
    schemes: Mapping[str, LayerScheme],
    progress: ProgressFn | None,
    rounder: Rounder,
) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """Every state-dict tensor (a shared one once), planned layers in their stored form: the
    files written, each tensor's bytes and the bytes beyond the plan's by cause."""
    by_param = {s.layer.param: s for s in schemes.values()}
    casts = {
        lay.param: FLOAT_DTYPES[lay.format.name]
        for lay in plan.layers
        if lay.format.kind == "float"
    }
    params = {id(p) for p in module.parameters()}
    extra = {"packing": 0, "scales": 0, "shapes": 0, "buffers": 0}
    shards = _Shards(folder)
    seen: set[int] = set()
    entries = list(module.state_dict(keep_vars=True).items())
    with torch.no_grad():
        for done, (name, tensor) in enumerate(entries, start=1):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if name in by_param:
                scheme = by_param[name]
                stored = _compress(tensor.detach(), scheme, rounder)
                for cause, nbytes in _extras(stored, scheme.layer.bytes).items():
                    extra[cause] += nbytes
                prefix = name.removesuffix("weight")
                for local, part in stored.items():
                    shards.add(prefix + local, part)
            else:
                dtype = casts.get(name, tensor.dtype)
                shards.add(name, tensor.detach().to(device="cpu", dtype=dtype).contiguous())
                if id(tensor) not in params:
                    extra["buffers"] += tensor.nbytes
            report(progress, "compressed-tensors", done, len(entries))
        return shards.finish(), shards.sizes, extra


def _quantization_config(
    module: nn.Module, schemes: Mapping[str, LayerScheme]
) -> QuantizationConfig:
    """One config group per stored scheme targeting its modules by name; others ignored."""
    targets: dict[str, list[LayerScheme]] = {}
    for s in schemes.values():
        targets.setdefault(s.group, []).append(s)
    groups = {
        group: QuantizationScheme(
            targets=[s.layer.name for s in members],
            weights=members[0].weights,
            format=members[0].compression,
        )
        for group, members in targets.items()
    }
    formats = {s.compression for s in schemes.values()}
    overall = formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision
    # vLLM needs every linear layer either targeted or ignored (the LM head by custom).
    ignore = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n not in schemes]
    return QuantizationConfig(
        config_groups=groups,
        format=overall.value,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )


def _write_side_files(
    folder: Path, model: LoadedModel, module: PreTrainedModel, qc: QuantizationConfig
) -> None:
    """config.json with the quantization config, generation config and tokenizer."""
    module.config.to_json_file(str(folder / "config.json"))
    ModelCompressor(quantization_config=qc).update_config(str(folder))
    if module.generation_config is not None:
        module.generation_config.save_pretrained(str(folder))
    if model.tokenizer is not None and hasattr(model.tokenizer, "save_pretrained"):
        model.tokenizer.save_pretrained(str(folder))


def write_compressed_tensors(
    *,
    model: LoadedModel,
    plan: Plan,
    out_dir: Path,
    vllm_checks: bool = True,
    progress: ProgressFn | None = None,
    rounder: Rounder | None = None,
) -> CompressedTensorsReport:
    """Write ``model`` quantized per ``plan`` as a compressed-tensors checkpoint in ``out_dir``.

    ``model`` is a Hugging Face model or ``builtin:tiny-lm`` (bitplan's ``load_model``; the
    builtin model is written as its OPT twin and not changed) and ``plan`` a plan made for it.
    With ``vllm_checks`` (default; ``bitplan apply`` always checks) plans vLLM cannot serve
    are refused (fused siblings in different formats, widths other than 4/8 bits, a quantized
    LM head); every refusal is an :class:`InputError` naming the layers and formats, raised
    before anything is written. Files appear in ``out_dir`` only once all are complete; a
    failure leaves none behind.
    """
    form = hf_form(model, plan)
    if form is None:
        raise InputError(
            f"{model.ref} is not a Hugging Face model, and a compressed-tensors checkpoint is "
            "a Hugging Face folder; write bitplan's own packed artifact for it instead (of the "
            "builtin models, tiny-lm is written as a transformers OPT)"
        )
    rounder = (rounder or Rounder()).renamed(form.param_names(plan))
    model, plan, module = form.model, form.plan, form.module
    out_dir = Path(out_dir)
    _check_plan(model, module, plan)
    schemes = layer_schemes(model=module, layers=plan.layers, vllm_checks=vllm_checks)
    if not schemes:
        raise InputError(
            "the plan quantizes no layer (every format is a float cast), so there is nothing "
            "for compressed-tensors to store; write bitplan's own artifact instead"
        )
    if vllm_checks:
        check_fused(model=module, schemes=schemes)
    if next(module.parameters()).dtype == torch.bfloat16:
        log.warning(
            "bf16 model: its scales are stored in fp32 (bitplan's fp16 values); runtimes that "
            "keep scales in bf16 round them on loading (at most 2^-9 relative)"
        )
    qc = _quantization_config(module, schemes)
    with staged_folder(out_dir) as staging:
        names, sizes, extra = _write_tensors(staging, module, plan, schemes, progress, rounder)
        total = sum(sizes.values())
        if total != plan.totals.total_bytes + sum(extra.values()):
            raise RuntimeError(
                f"wrote {total} tensor bytes, but the plan's {plan.totals.total_bytes} and the "
                f"layout's extras {extra} add up to {plan.totals.total_bytes + sum(extra.values())}"
            )
        _write_side_files(staging, model, module, qc)
        plan.write(staging / PLAN_FILE)
    if form.conversion is not None:
        extra.update(form.conversion["extra_bytes"])
    log.info(
        "wrote %s: %d tensor bytes (plan %d, compressed-tensors layout %s)",
        out_dir,
        total,
        form.plan_total_bytes,
        extra,
    )
    return CompressedTensorsReport(
        path=out_dir,
        tensor_bytes=sizes,
        total_bytes=total,
        plan_path=out_dir / PLAN_FILE,
        files=tuple(out_dir / n for n in names),
        plan_bytes=form.plan_total_bytes,
        extra_bytes=extra,
        config_groups={
            g: tuple(s.targets)
            for g, s in qc.config_groups.items()
            if isinstance(s, QuantizationScheme)
        },
        ignored=tuple(qc.ignore or ()),
    )
