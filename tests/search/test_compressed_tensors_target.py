"""``--to compressed-tensors``: the checkpoint as compressed-tensors and transformers read it.

The consumer decides: every check decompresses the written folder with compressed-tensors' own
code, either model-free (``CompressedTensorsDequantizer``, the package's checkpoint
dequantizer) or through transformers' ``from_pretrained`` (its compressed-tensors integration,
which decompresses on the first forward pass), and compares with bitplan's fake-quantized model
(:class:`~bitplan.search.applier.PlanApplier`, the DESIGN §3 reference arithmetic).

Tolerance is zero throughout: the stored scales hold bitplan's fp16 scales exactly (fp32 for
fp32/bf16 models, fp16 for fp16 models), ``(q − zp)·scale`` is exact in fp32, and an fp16
product is rounded once, as bitplan's fp16 fake-quant is; equal weights then give equal logits.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from compressed_tensors.compressors.pack_quantized import base as pack_base
from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer
from safetensors.torch import load_file
from torch import nn

import bitplan
from bitplan.search import runtime_compressed_tensors as ct_target
from bitplan.search.applier import PlanApplier
from bitplan.search.artifact import ArtifactReport, tensor_bytes_of
from bitplan.search.hf_folder import is_transformers_weight_file
from bitplan.search.plans import Plan, make_plan, read_plan
from bitplan.search.runtime_compressed_tensors import write_compressed_tensors
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import parse_format
from bitplan.sensitivity.layers import find_quant_layers, parameter_bytes
from bitplan.sensitivity.models import LoadedModel, load_model
from tests.helpers import write_tiny_hf_model

# The tiny LLaMA: hidden 32, MLP 64, one KV head of 16, so k/v_proj are [16, 32] and
# down_proj is [32, 64]. The embedding and LM head stay unplanned unless a test plans them.
EXCLUDE = ("lm_head", "model.embed_tokens")
TOKENS = torch.tensor([[1, 5, 9, 2, 7, 3, 30, 41]])
# A mixed plan vLLM can serve: int4 per group and per row, int8 asymmetric, fp8, a float cast,
# and whole fused sets (q/k/v, gate/up) in one format each. Patterns match in order.
MIXED = {
    "model.layers.0.self_attn.[qkv]_proj": "int4-g16",
    "model.layers.0.self_attn.o_proj": "int8-g16-asym",
    "model.layers.0.mlp.*_proj": "int4-asym",
    "model.layers.1.self_attn.[qkv]_proj": "int8",
    "model.layers.1.self_attn.o_proj": "fp8-e4m3",
    "model.layers.1.mlp.[gu]*_proj": "fp16",
    "model.layers.1.mlp.down_proj": "int4-g64",  # one group spans the row: stored per row
}
# The same, symmetric only: transformers 5 with compressed-tensors 0.20 cannot load asymmetric
# packed layers (their zero points are built unpacked on the meta device), see the module.
SYMMETRIC = {
    **MIXED,
    "model.layers.0.self_attn.o_proj": "int8-g16",
    "model.layers.0.mlp.*_proj": "int4",
}


def _model(
    root: Path, dtype: torch.dtype = torch.float32, exclude: tuple[str, ...] = EXCLUDE
) -> LoadedModel:
    folder = write_tiny_hf_model(root / "src", "llama", task="text-generation", dtype=dtype)
    return load_model(str(folder), device="cpu", exclude=list(exclude))


def _plan(model: LoadedModel, formats: Mapping[str, str]) -> Plan:
    def fmt(name: str) -> str:
        return next(f for pattern, f in formats.items() if fnmatch.fnmatchcase(name, pattern))

    unplanned, fp16 = parameter_bytes(model.module, model.layers)
    return make_plan(
        model_ref=model.ref,
        model_sha256=model.sha256,
        layers=model.layers,
        choice={lay.group: parse_format(fmt(lay.name)) for lay in model.layers},
        budget=None,
        unplanned_bytes=unplanned,
        fp16_bytes=fp16,
        predicted_error=None,
    )


def _reference(model: LoadedModel, plan: Plan) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """bitplan's fake-quantized state dict and logits (the model is restored afterwards)."""
    with torch.no_grad(), PlanApplier(model.module, model.layers) as applier:
        applier.apply(plan.choice())
        state = {k: v.clone() for k, v in model.module.state_dict().items()}
        return state, model.module(TOKENS).logits


def _model_free(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """compressed-tensors' own checkpoint dequantizer, on every shard's tensors."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        if is_transformers_weight_file(shard.name):  # the model's, not other files there
            tensors.update(load_file(shard))
    return CompressedTensorsDequantizer(folder, dtype=dtype).process(tensors)


def _expected_extra(plan: Plan, scale_bytes: int) -> dict[str, int]:
    """Bytes beyond the plan's, from compressed-tensors' layout: codes packed into int32 words a
    row, zero points packed into int32 words along the rows, a 2-int64 weight_shape, scales of
    ``scale_bytes``."""
    extra = {"packing": 0, "scales": 0, "shapes": 0, "buffers": 0}
    for lay in plan.layers:
        fmt = lay.format
        assert lay.shape is not None
        rows, cols = lay.shape
        if fmt.kind == "fp8":
            extra["scales"] += rows * (scale_bytes - 2)
        if fmt.kind != "int":
            continue
        per_row = 1 if fmt.group_size is None or fmt.group_size >= cols else cols // fmt.group_size
        codes = rows * math.ceil(cols * fmt.bits / 32) * 4
        zeros = 0 if fmt.symmetric else math.ceil(rows * fmt.bits / 32) * per_row * 4
        extra["packing"] += codes + zeros + 2 * rows * per_row - lay.bytes
        extra["scales"] += rows * per_row * (scale_bytes - 2)
        extra["shapes"] += 2 * 8
    return extra


def _check_bytes(report: ct_target.CompressedTensorsReport, plan: Plan, scale_bytes: int) -> None:
    on_disk = sum(tensor_bytes_of(f) for f in report.files)
    assert on_disk == report.total_bytes
    assert report.plan_bytes == plan.totals.total_bytes
    assert report.extra_bytes == _expected_extra(plan, scale_bytes)
    assert report.total_bytes == plan.totals.total_bytes + sum(report.extra_bytes.values())


def _check_config(folder: Path, model: LoadedModel, plan: Plan) -> None:
    """vLLM's view: every linear layer in exactly one group's targets or in ignore, quantized
    layers in the group of their format, and one format per config group."""
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["quantization_status"] == "compressed"
    planned = {lay.name: lay.format for lay in plan.layers}
    linear = [n for n, m in model.module.named_modules() if isinstance(m, nn.Linear)]
    seen = list(qc["ignore"])
    for group in qc["config_groups"].values():
        seen += group["targets"]
        weights = group["weights"]
        for name in group["targets"]:
            fmt = planned[name]
            assert (weights["num_bits"], weights["symmetric"]) == (fmt.bits, fmt.symmetric)
            assert weights["type"] == ("float" if fmt.kind == "fp8" else "int")
            cols = model.module.get_submodule(name).in_features
            grouped = fmt.group_size is not None and fmt.group_size < cols
            assert weights["group_size"] == (fmt.group_size if grouped else None)
            assert group["format"] == ("float-quantized" if fmt.kind == "fp8" else "pack-quantized")
    assert sorted(seen) == sorted(linear)
    assert {n for n in qc["ignore"] if n in planned} == {
        n for n, f in planned.items() if not f.is_quantized
    }
    assert qc["format"] == "mixed-precision"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_plan_decompresses_to_bitplans_weights(
    tmp_path: Path, dtype: torch.dtype, caplog: pytest.LogCaptureFixture
) -> None:
    model = _model(tmp_path, dtype)
    plan = _plan(model, MIXED)
    out = tmp_path / "ct"
    out.mkdir()
    stale = out / "model-00001-of-00009.safetensors"
    stale.write_bytes(b"an earlier export")
    theirs = out / "model-fp32-backup.safetensors"  # not a name transformers reads: not ours
    theirs.write_bytes(b"someone else's")
    report = write_compressed_tensors(model=model, plan=plan, out_dir=out)

    state, logits = _reference(model, plan)
    decompressed = _model_free(out, dtype)
    assert set(decompressed) == set(state)
    for name, tensor in state.items():  # an fp16-planned layer is stored (and read) as fp16
        assert torch.equal(decompressed[name].to(tensor.dtype), tensor), name
    fresh = copy.deepcopy(model.module)
    fresh.load_state_dict(decompressed, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(TOKENS).logits, logits)

    _check_bytes(report, plan, scale_bytes=4)  # fp32 and bf16 models get fp32 scales
    _check_config(out, model, plan)
    assert not stale.exists()
    assert theirs.read_bytes() == b"someone else's"
    assert read_plan(out / "plan.json") == plan
    assert {p.name for p in tmp_path.iterdir()} == {"src", "ct"}  # the staging folder is gone
    assert ("bf16 model" in caplog.text) == (dtype == torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_transformers_loads_it_with_bitplans_logits(
    tmp_path: Path, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(tmp_path, dtype)
    plan = _plan(model, SYMMETRIC)
    monkeypatch.setattr(ct_target, "_SHARD_BYTES", 8 << 10)  # several shards and an index
    report = write_compressed_tensors(model=model, plan=plan, out_dir=tmp_path / "ct")
    assert len(report.files) > 1 and (tmp_path / "ct" / "model.safetensors.index.json").is_file()
    _check_bytes(report, plan, scale_bytes=dtype.itemsize)

    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", output_loading_info=True
    )
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    state, logits = _reference(model, plan)
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, logits)  # decompresses on this first pass
    loaded_state = loaded.state_dict()  # also holds the scales compressed-tensors keeps
    for name, tensor in state.items():
        assert loaded_state[name].dtype == dtype, name
        assert torch.equal(loaded_state[name], tensor), name


def _nothing_written(root: Path) -> None:
    assert {p.name for p in root.iterdir()} == {"src"}  # no output folder, no partial one


def test_fused_siblings_in_different_formats_are_refused(tmp_path: Path) -> None:
    model = _model(tmp_path)
    plan = _plan(model, {"model.layers.0.self_attn.k_proj": "int8", "*": "int4-g16"})
    with pytest.raises(InputError) as err:
        write_compressed_tensors(model=model, plan=plan, out_dir=tmp_path / "ct")
    message = str(err.value)
    assert "q_proj/k_proj/v_proj of model.layers.0.self_attn (int4-g16, int8, int4-g16)" in message
    assert "model.layers.1" not in message  # layer 1's siblings agree
    assert "--fuse qkv,gate_up" in message and "vLLM checks" not in message  # advice one can take
    _nothing_written(tmp_path)

    write_compressed_tensors(model=model, plan=plan, out_dir=tmp_path / "ct", vllm_checks=False)
    state, _ = _reference(model, plan)
    decompressed = _model_free(tmp_path / "ct", torch.float32)
    assert all(torch.equal(decompressed[k].to(v.dtype), v) for k, v in state.items())


def test_other_widths_only_without_vllm_checks(tmp_path: Path) -> None:
    """3/5/2-bit, asymmetric with zero points that do not fill an int32 word: refused for vLLM,
    exact for compressed-tensors, and the word padding is what the report says."""
    model = _model(tmp_path)
    formats = {"*.[kv]_proj": "int3-g16-asym", "*.q_proj": "int5", "*": "int2-g8"}
    plan = _plan(model, formats)
    with pytest.raises(
        InputError, match=r"self_attn\.q_proj is planned as int5.*4 or 8-bit"
    ) as err:
        write_compressed_tensors(model=model, plan=plan, out_dir=tmp_path / "ct")
    assert "vLLM checks" not in str(err.value)  # no switch bitplan apply offers
    _nothing_written(tmp_path)

    report = write_compressed_tensors(
        model=model, plan=plan, out_dir=tmp_path / "ct", vllm_checks=False
    )
    state, _ = _reference(model, plan)
    decompressed = _model_free(tmp_path / "ct", torch.float32)
    assert all(torch.equal(decompressed[k].to(v.dtype), v) for k, v in state.items())
    _check_bytes(report, plan, scale_bytes=4)
    assert report.extra_bytes["packing"] > 0


@pytest.mark.parametrize(
    ("exclude", "formats", "match"),
    [
        (
            EXCLUDE,
            {"*.o_proj": "int4-g24", "*": "int8"},
            r"o_proj has rows of 32 weights.*int4-g24",
        ),
        (
            ("model.embed_tokens",),
            {"lm_head": "int8", "*": "fp16"},
            r"lm_head is the output embedding",
        ),
        (("lm_head",), {"model.embed_tokens": "int8", "*": "fp16"}, r"embed_tokens \(Embedding\)"),
        (EXCLUDE, {"*": "fp16"}, r"quantizes no layer"),
        (EXCLUDE, {"*.down_proj": "q8_0", "*": "int8"}, r"down_proj is planned as q8_0, a llama"),
    ],
)
def test_plans_compressed_tensors_cannot_store_are_refused(
    tmp_path: Path, exclude: tuple[str, ...], formats: dict[str, str], match: str
) -> None:
    model = _model(tmp_path, exclude=exclude)
    with pytest.raises(InputError, match=match):
        write_compressed_tensors(model=model, plan=_plan(model, formats), out_dir=tmp_path / "ct")
    _nothing_written(tmp_path)


def test_a_weight_shared_by_two_linear_layers_is_refused(tmp_path: Path) -> None:
    """One tensor cannot be packed once and targeted by two modules."""
    model = _model(tmp_path)
    mlp = model.module.get_submodule("model.layers.0.mlp")
    mlp.up_proj.weight = mlp.gate_proj.weight  # both [64, 32]
    model = replace(model, layers=find_quant_layers(model.module, exclude=EXCLUDE))
    with pytest.raises(InputError, match=r"gate_proj shares its weight .* planned as int4"):
        write_compressed_tensors(
            model=model, plan=_plan(model, {"*": "int4"}), out_dir=tmp_path / "ct"
        )
    _nothing_written(tmp_path)


def test_plan_for_another_model_or_a_non_hf_model_is_refused(tmp_path: Path) -> None:
    model = _model(tmp_path)
    plan = _plan(model, {"*": "int8"})
    other = Plan.from_dict({**plan.to_dict(), "model": {"ref": "x", "sha256": "cd" * 32}})
    with pytest.raises(InputError, match="made for model sha256 cdcdcd"):
        write_compressed_tensors(model=model, plan=other, out_dir=tmp_path / "ct")
    builtin = LoadedModel(
        ref="builtin:tiny",
        sha256=model.sha256,
        module=nn.Linear(4, 4),
        task="text-generation",
        layers=[],
        tokenizer=None,
        device=torch.device("cpu"),
    )
    with pytest.raises(InputError, match="not a Hugging Face model"):
        write_compressed_tensors(model=builtin, plan=plan, out_dir=tmp_path / "ct")
    _nothing_written(tmp_path)


def test_a_decompressor_that_disagrees_stops_the_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each layer is decompressed again with compressed-tensors' code before it is written."""
    model = _model(tmp_path)
    unpack = pack_base.unpack_from_int32

    def off_by_one(*args: object, **kwargs: object) -> torch.Tensor:
        return unpack(*args, **kwargs) + 1  # type: ignore[arg-type]

    monkeypatch.setattr(pack_base, "unpack_from_int32", off_by_one)
    with pytest.raises(RuntimeError, match="does not decompress model.layers.0.self_attn.q_proj"):
        write_compressed_tensors(
            model=model, plan=_plan(model, {"*": "int4-g16"}), out_dir=tmp_path / "ct"
        )
    _nothing_written(tmp_path)


def test_bitplan_apply_writes_it(tmp_path: Path) -> None:
    """``bitplan.apply(to="compressed-tensors")`` (what ``bitplan apply --to`` runs) loads the
    model from its folder and writes the checkpoint; the report is the registry's
    ArtifactReport with ``path`` the folder, and compressed-tensors decompresses the folder to
    bitplan's weights."""
    model = _model(tmp_path)
    plan = _plan(model, MIXED)
    out = tmp_path / "ct"
    report = bitplan.apply(
        model=tmp_path / "src",
        plan=plan.write(tmp_path / "plan.json"),
        out_dir=out,
        to="compressed-tensors",
    )
    assert isinstance(report, ArtifactReport)
    assert isinstance(report, ct_target.CompressedTensorsReport)
    assert report.path == out and report.plan_path == out / "plan.json"
    assert read_plan(report.plan_path) == plan
    assert sum(report.tensor_bytes.values()) == report.total_bytes
    assert report.total_bytes == sum(tensor_bytes_of(f) for f in report.files)
    assert "model.layers.0.self_attn.q_proj.weight_packed" in report.tensor_bytes
    _check_bytes(report, plan, scale_bytes=4)
    state, _ = _reference(model, plan)
    decompressed = _model_free(out, torch.float32)
    assert set(decompressed) == set(state)
    assert all(torch.equal(decompressed[k].to(v.dtype), v) for k, v in state.items())
