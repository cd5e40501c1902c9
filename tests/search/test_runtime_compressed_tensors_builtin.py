"""``bitplan apply builtin:tiny-lm --to compressed-tensors``: its OPT twin's checkpoint, read by
compressed-tensors' own dequantizer and by transformers, is bitplan's fake-quantized builtin
model (weights, logits, held-out error), and its bytes are the plan's plus compressed-tensors'
layout plus OPT's two position rows, each counted in the report.

Approach of ``tests/search/test_compressed_tensors_target.py`` (whose layout rules this file
reuses); the tolerances are in ``tests/search/_builtin_hf.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import bitplan
from bitplan.search.artifact import tensor_bytes_of
from bitplan.search.plans import read_plan
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.models import LoadedModel
from tests.runtimes import require_runtime
from tests.search._builtin_hf import (
    ERROR_RTOL,
    assert_logits_close,
    fake_quantized_logits,
    fake_quantized_weights,
    held_out,
    held_out_errors,
    opt_name,
    opt_param,
    plan_by_pattern,
)

# A mixed plan vLLM can serve (tiny-lm: rows of 64, fc_out of 256): int4 per group and per row,
# int8, fp8, float casts; q/k/v of a block in one format (vLLM fuses them); the tied embedding
# and the position table as floats (compressed-tensors quantizes linear layers only). Block 3
# matches no pattern: it is left out of the plan, as an excluded layer would be.
PLAN: dict[str, str | None] = {
    "wte": "fp16",
    "lm_head": "fp16",
    "wpe": "bf16",
    "blocks.0.attn.[qkv]_proj": "int4-g16",
    "blocks.0.attn.o_proj": "int8",
    "blocks.0.fc_in": "int4",
    "blocks.0.fc_out": "int4-g32",
    "blocks.1.attn.*": "fp8-e4m3",
    "blocks.1.*": "int8-g32",
    "blocks.2.attn.*": "fp16",
    "blocks.2.*": "int4-g64",  # a group spanning fc_in's row of 64: stored per row
}


def test_mixed_plan_is_bitplans_model_in_compressed_tensors_and_transformers(
    tiny_lm_model: LoadedModel, tmp_path: Path
) -> None:
    require_runtime("compressed_tensors")
    from bitplan.search.runtime_compressed_tensors import CompressedTensorsReport
    from tests.search.test_compressed_tensors_target import _expected_extra, _model_free

    model = tiny_lm_model
    plan = plan_by_pattern(model, PLAN)
    out = tmp_path / "ct"
    report = bitplan.apply(
        model="builtin:tiny-lm",
        plan=plan.write(tmp_path / "plan.json"),
        out_dir=out,
        to="compressed-tensors",
    )
    assert isinstance(report, CompressedTensorsReport)

    # compressed-tensors' own dequantizer gives bitplan's fake-quantized weights
    weights = fake_quantized_weights(model, plan)
    decompressed = _model_free(out, torch.float32)
    for lay in plan.layers:
        name, want = lay.name, weights[lay.name]
        got = decompressed[opt_param(lay.param)].float()  # the tied head is stored once
        if name == "wpe":
            assert not got[:2].any()  # OPT's two leading rows: zeros
            got = got[2:]
        assert torch.equal(got, want), name

    # transformers loads it: logits and held-out error through it are bitplan's
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert type(loaded).__name__ == "OPTForCausalLM" and loaded.dtype == torch.float32
    data = held_out(model)
    ids = data.inputs["input_ids"]
    with torch.no_grad():
        got_logits = loaded(input_ids=ids).logits  # compressed-tensors decompresses here
    assert_logits_close(got_logits, fake_quantized_logits(model, plan, ids))
    runtime_error, bitplan_error = held_out_errors(model, plan, loaded, data)
    assert bitplan_error > 0
    assert abs(runtime_error / bitplan_error - 1) <= ERROR_RTOL

    # bytes: the plan's + compressed-tensors' layout + OPT's two position rows (bf16 here)
    assert sum(tensor_bytes_of(f) for f in report.files) == report.total_bytes
    assert report.plan_bytes == plan.totals.total_bytes
    layout = _expected_extra(plan, scale_bytes=4)  # fp32 model: fp32 scales
    assert report.extra_bytes == {**layout, "opt_position_rows": 2 * 64 * 2}
    assert report.total_bytes == plan.totals.total_bytes + sum(report.extra_bytes.values())

    # vLLM's view of the config: OPT's names, q/k/v of a block in one group, the head ignored
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    targets = {t: g for g, group in qc["config_groups"].items() for t in group["targets"]}
    qkv = [f"model.decoder.layers.0.self_attn.{x}_proj" for x in "qkv"]
    assert len({targets[name] for name in qkv}) == 1
    assert "lm_head" in qc["ignore"] and "model.decoder.layers.3.fc1" in qc["ignore"]
    written = read_plan(out / "plan.json")  # the plan under the folder's names
    assert [lay.name for lay in written.layers] == [opt_name(lay.name) for lay in plan.layers]


def test_plans_vllm_cannot_serve_are_refused_with_opt_names(
    tiny_lm_model: LoadedModel, tmp_path: Path
) -> None:
    """The refusals of ``test_compressed_tensors_target`` hold for the builtin model too, and
    name the layers as the written folder would (OPT's), before anything is written."""
    require_runtime("compressed_tensors")
    cases = {
        # OPT declares k, v, q in that order
        r"k_proj/v_proj/q_proj of model.decoder.layers.0.self_attn \(int8, int4-g16, int4": {
            "blocks.0.attn.k_proj": "int8",
            "blocks.0.*": "int4-g16",
        },
        r"model.decoder.embed_tokens \(Embedding\)": {"wte": "int8", "lm_head": "int8"},
        "model.decoder.layers.0.fc1 is planned as int3": {"blocks.0.fc_in": "int3"},
    }
    for match, formats in cases.items():
        plan = plan_by_pattern(tiny_lm_model, formats)
        with pytest.raises(InputError, match=match):
            bitplan.apply(
                model="builtin:tiny-lm", plan=plan, out_dir=tmp_path / "ct", to="compressed-tensors"
            )
        assert not (tmp_path / "ct").exists()
