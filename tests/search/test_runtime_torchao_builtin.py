"""``bitplan apply builtin:tiny-lm --to torchao``: its OPT twin's folder, loaded by transformers
+ torchao, runs bitplan's fake-quantized builtin model (logits and held-out error), and its bytes
are the plan's plus torchao's storage plus OPT's two position rows, each accounted for.

Approach of ``tests/search/test_torchao_target.py`` (whose storage rules this file reuses);
the tolerances are in ``tests/search/_builtin_hf.py``.
"""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import torch
import transformers

import bitplan
from bitplan.search.artifact import tensor_bytes_of
from bitplan.search.plans import read_plan
from bitplan.sensitivity.builtin_nets import ByteTokenizer
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.models import LoadedModel
from tests.helpers import uniform_plan
from tests.runtimes import require_runtime
from tests.search._builtin_hf import (
    ERROR_RTOL,
    assert_logits_close,
    fake_quantized_logits,
    fake_quantized_weights,
    held_out,
    held_out_errors,
    opt_name,
    plan_by_pattern,
)

INTX, FLOAT8, PLAIN = "IntxUnpackedToInt8Tensor", "Float8Tensor", "Parameter"
# A mixed plan of tiny-lm (rows of 64, fc_out of 256) and how torchao stores each layer.
# Block 3 matches no pattern: it is left out of the plan, as an excluded layer would be.
PLAN = {
    "wte": ("int8", PLAIN),  # tied to lm_head: a shared torchao tensor does not load
    "lm_head": ("int8", PLAIN),
    "wpe": ("int4-g16", INTX),  # OPT's position table, with its two leading rows
    "blocks.0.attn.[qkv]_proj": ("int4-g16", INTX),
    "blocks.0.attn.o_proj": ("fp8-e4m3", FLOAT8),
    "blocks.0.fc_in": ("int3-g16-asym", INTX),
    "blocks.0.fc_out": ("int8", INTX),
    "blocks.1.attn.q_proj": ("int6-g24", PLAIN),  # 24 does not divide 64: dequantized
    "blocks.1.attn.*": ("bf16", PLAIN),  # a cast
    "blocks.1.*": ("int2-g32-asym", INTX),
    "blocks.2.attn.*": ("int4-g128-asym", INTX),  # one group spans the row of 64: per row
    "blocks.2.*": ("int5", INTX),
}
FORMATS: dict[str, str | None] = {pattern: fmt for pattern, (fmt, _) in PLAN.items()}


def _storage(name: str) -> str:
    return next(storage for pattern, (_, storage) in PLAN.items() if fnmatchcase(name, pattern))


def _expected_disk_bytes(model: LoadedModel, stored: dict[str, str]) -> int:
    """torchao's bytes by its rules, from the builtin model alone: the rules of
    ``test_torchao_target`` (an int8 a code + fp16 scale + int8 zero point a group; fp8 codes
    + an fp32 scale a row; casts at their dtype; dequantized at float32) over each stored tensor
    once (the tied head is wte's tensor), plus OPT's two zero position rows in wpe's storage
    (int4-g16: 64 int8 codes and 4 groups of 3 bytes a row)."""
    from tests.search.test_torchao_target import _expected_disk_bytes as torchao_rules

    once = plan_by_pattern(model, {**FORMATS, "lm_head": None})  # wte's tensor once
    return torchao_rules(model, once, stored) + 2 * (64 + 3 * 4)


def test_mixed_plan_runs_bitplans_model_in_transformers(
    tiny_lm_model: LoadedModel, tmp_path: Path
) -> None:
    require_runtime("torchao")
    from bitplan.search.runtime_torchao import NOTE_FILE

    model = tiny_lm_model
    plan = plan_by_pattern(model, FORMATS)
    out = tmp_path / "torchao"
    report = bitplan.apply(
        model="builtin:tiny-lm", plan=plan.write(tmp_path / "plan.json"), out_dir=out, to="torchao"
    )
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__ == "OPTForCausalLM" and loaded.dtype == torch.float32

    # every layer in the storage torchao gives it, holding bitplan's fake-quantized weights
    weights = fake_quantized_weights(model, plan)
    stored = {lay.name: _storage(lay.name) for lay in plan.layers}
    for name, want in stored.items():
        weight = loaded.get_submodule(opt_name(name)).weight
        assert type(weight).__name__ == want, name
        dense = weight.dequantize() if want != PLAIN else weight.detach()
        if name == "wpe":
            assert not dense[:2].any()  # OPT's two leading rows: zeros
            dense = dense[2:]
        assert torch.equal(dense, weights[name]), name

    # logits and held-out error through the runtime are bitplan's
    data = held_out(model)
    ids = data.inputs["input_ids"]
    assert_logits_close(
        loaded(input_ids=ids).logits.detach(), fake_quantized_logits(model, plan, ids)
    )
    runtime_error, bitplan_error = held_out_errors(model, plan, loaded, data)
    assert bitplan_error > 0
    assert abs(runtime_error / bitplan_error - 1) <= ERROR_RTOL

    # bytes: the plan's, torchao's storage per layer and OPT's position rows, each in the note
    disk = tensor_bytes_of(out / "model.safetensors")
    assert disk == report.total_bytes == _expected_disk_bytes(model, stored)
    note = json.loads((out / NOTE_FILE).read_text())
    assert note["plan_total_bytes"] == plan.totals.total_bytes
    assert note["tensor_bytes"] == disk
    conversion = note["conversion"]
    assert conversion["architecture"] == "OPTForCausalLM"
    assert conversion["modules"] == {lay.name: opt_name(lay.name) for lay in plan.layers}
    assert conversion["extra_bytes"] == {"opt_position_rows": 2 * (64 * 4 + 4 * 16) // 8}
    per_layer = sum(e["bytes"] - e["plan_bytes"] for e in note["layers"])
    assert note["extra_bytes"] == disk - plan.totals.total_bytes
    assert note["extra_bytes"] == per_layer + sum(conversion["extra_bytes"].values())
    assert read_plan(out / "plan.json").layers[0].name == "model.decoder.embed_tokens"

    # the folder generates text with a tokenizer of the builtin model's byte ids
    tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = "The plan keeps "
    assert tok(prompt)["input_ids"] == ByteTokenizer()(prompt)["input_ids"][0]
    generated = loaded.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=8)
    assert generated.shape == (1, len(prompt) + 8)
    assert tok.decode(generated[0]).startswith(prompt)


@pytest.mark.parametrize(
    ("target", "package", "reason"),
    [
        ("torchao", "torchao", "is not a transformers model; use --to bitplan"),
        ("compressed-tensors", "compressed_tensors", "is not a Hugging Face model"),
    ],
)
def test_builtin_models_without_a_twin_are_refused(
    digits_model: LoadedModel, tmp_path: Path, target: str, package: str, reason: str
) -> None:
    """The digits CNN has no transformers architecture: both Hugging Face targets refuse it,
    say why and which builtin model they take, and write nothing."""
    require_runtime(package)
    plan = uniform_plan(digits_model, "int8")
    with pytest.raises(InputError, match=rf"builtin:digits-cnn {reason}.*tiny-lm is written as"):
        bitplan.apply(model="builtin:digits-cnn", plan=plan, out_dir=tmp_path / "out", to=target)
    assert not (tmp_path / "out").exists()
