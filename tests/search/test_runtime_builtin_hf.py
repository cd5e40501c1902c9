"""``builtin:tiny-lm`` as a transformers OPT: the conversion alone, before any quantization.

The OPT twin must compute the builtin model's function (same logits on held-out text, padded
batches included), survive transformers' own save and load, leave the builtin model untouched,
tokenize like the byte tokenizer, and carry the plan over under OPT's names with exactly the
bytes OPT's position table adds. See ``tests/search/_builtin_hf.py`` for the tolerance.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from bitplan.search.builtin_hf import byte_tokenizer, opt_twin
from bitplan.search.hf_form import CONVERSION_CAUSE, hf_form
from bitplan.search.plans import Plan
from bitplan.sensitivity.builtin_nets import ByteTokenizer
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.fusion import fuse_layers
from bitplan.sensitivity.models import LoadedModel
from tests.search._builtin_hf import (
    assert_logits_close,
    held_out,
    logits_of,
    opt_name,
    opt_param,
    plan_by_pattern,
)


def test_fp_twin_reproduces_the_builtin_logits(tiny_lm_model: LoadedModel, tmp_path: Path) -> None:
    model = tiny_lm_model
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    twin = opt_twin(model.module)
    assert isinstance(twin.module, transformers.OPTForCausalLM)
    assert twin.module.lm_head.weight is twin.module.model.decoder.embed_tokens.weight  # tied
    ids = held_out(model).inputs["input_ids"]
    want = logits_of(model.module, ids)
    assert_logits_close(logits_of(twin.module, ids), want)

    twin.module.save_pretrained(tmp_path / "opt")  # what a target ships, read back by transformers
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "opt")
    assert loaded.dtype == torch.float32
    assert_logits_close(logits_of(loaded, ids), want)
    after = model.module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the builtin is untouched
    assert model.module.lm_head.weight is model.module.wte.weight


def test_fp_twin_matches_on_padded_batches(tiny_lm_model: LoadedModel) -> None:
    """Right padding (ByteTokenizer's): every real position has the builtin model's logits."""
    batch = ByteTokenizer()(
        ["The plan keeps sensitive layers", "short", "a third, longer sentence of bytes"],
        padding=True,
        return_tensors="pt",
    )
    mask = batch["attention_mask"].bool()
    assert not mask.all()  # the batch does pad
    with torch.no_grad():
        want = tiny_lm_model.module(**batch)
        got = opt_twin(tiny_lm_model.module).module(**batch).logits
    assert got.shape == want.shape
    assert_logits_close(got[mask], want[mask])


def test_twin_names_weights_and_position_rows(tiny_lm_model: LoadedModel) -> None:
    module = tiny_lm_model.module
    twin = opt_twin(module)
    state = twin.module.state_dict()
    for lay in tiny_lm_model.layers:
        name = opt_name(lay.name)
        assert twin.hf_name(lay.name) == name
        theirs = state[f"{name}.weight"]
        ours = module.get_submodule(lay.name).weight
        if lay.name == "wpe":  # OPT reads row t + 2 for position t; rows 0 and 1 are zeros
            assert twin.position_rows == 2
            assert torch.equal(theirs[2:], ours)
            assert not theirs[:2].any()
        else:
            assert torch.equal(theirs, ours), lay.name
    config = twin.module.config
    assert (config.activation_function, config.do_layer_norm_before) == ("gelu", True)
    assert config.ffn_dim == 4 * config.hidden_size


def test_refuses_what_opt_cannot_compute(tiny_lm_model: LoadedModel) -> None:
    module = tiny_lm_model.module
    norm = module.blocks[0].ln_1
    eps = norm.eps
    norm.eps = 1e-6
    try:
        with pytest.raises(InputError, match=r"blocks\.0\.ln_1 has eps 1e-06.*no transformers"):
            opt_twin(module)
    finally:
        norm.eps = eps


def test_byte_tokenizer_has_the_builtin_ids() -> None:
    ours, theirs = ByteTokenizer(), byte_tokenizer(max_length=64)
    texts = ["héllo wörld\n\t€ 1+1=2", "x", "\x00\x7f control bytes"]
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ids == list(text.encode("utf-8"))
        assert theirs.decode(ids) == text
    batch = theirs(texts, padding=True, return_tensors="pt")
    want = ours(texts, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], want["input_ids"])  # right padding with byte 0
    assert torch.equal(batch["attention_mask"], want["attention_mask"])


# Every kind of choice a plan makes: a tied embedding, the position table, a share group.
PLAN = {
    "wte": "int8",
    "lm_head": "int8",
    "wpe": "int4-g16",
    "blocks.0.attn.[qkv]_proj": "int4-g32",
    "blocks.0.*": "fp8-e4m3",
    "blocks.1.*": "bf16",
    "blocks.2.fc_out": "int2-g32-asym",
    "blocks.3.*": None,  # left out of the plan
}


def _fused_plan(model: LoadedModel) -> Plan:
    return plan_by_pattern(replace(model, layers=fuse_layers(model.layers, ["qkv"])), PLAN)


def test_the_plan_is_carried_over_under_opt_names(tiny_lm_model: LoadedModel) -> None:
    plan = _fused_plan(tiny_lm_model)
    form = hf_form(tiny_lm_model, plan)
    assert form is not None and form.conversion is not None
    mapped = {lay.name: lay for lay in form.plan.layers}
    assert list(mapped) == [opt_name(lay.name) for lay in plan.layers]
    for lay in plan.layers:
        other = mapped[opt_name(lay.name)]
        assert (other.format, other.param) == (lay.format, opt_param(lay.param))
        assert other.shape == ((66, 64) if lay.name == "wpe" else lay.shape)
    assert mapped["lm_head"].tie == "model.decoder.embed_tokens.weight"
    shares = {lay.share for lay in form.plan.layers if lay.share}
    assert shares == {f"model.decoder.layers.{i}.self_attn.qkv" for i in (0, 1)}  # planned
    # the two rows OPT adds, in wpe's int4-g16: 64 codes of 4 bits and 4 fp16 scales a row
    rows_bytes = 2 * (64 * 4 + 4 * 16) // 8
    assert form.conversion_bytes == rows_bytes == 80
    assert form.conversion["extra_bytes"] == {CONVERSION_CAUSE: rows_bytes}
    assert form.plan_total_bytes == plan.totals.total_bytes
    assert form.plan.totals.unplanned_bytes == plan.totals.unplanned_bytes  # wpe is planned
    assert form.plan.model_sha256 == tiny_lm_model.sha256
    assert [lay.name for lay in form.model.layers] == list(mapped)

    unplanned = plan_by_pattern(tiny_lm_model, {**PLAN, "wpe": None})
    form = hf_form(tiny_lm_model, unplanned)
    assert form is not None and form.conversion_bytes == 2 * 64 * 4  # float32 rows


def test_other_models_and_plans_are_refused(tiny_lm_model: LoadedModel) -> None:
    plan = plan_by_pattern(tiny_lm_model, PLAN)
    other = replace(tiny_lm_model, module=nn.Sequential(nn.Linear(4, 4)))
    assert hf_form(other, plan) is None  # the writers then refuse with their own reason
    wrong = Plan.from_dict({**plan.to_dict(), "model": {"ref": "x", "sha256": "ab" * 32}})
    with pytest.raises(InputError, match="made for model sha256 ababab"):
        hf_form(tiny_lm_model, wrong)
    data = plan.to_dict()
    data["totals"] = {**data["totals"], "unplanned_bytes": 4, "total_bytes": 4}
    data["totals"]["total_bytes"] += data["totals"]["planned_bytes"]
    data["totals"]["ratio_vs_fp16"] = data["totals"]["total_bytes"] / data["totals"]["fp16_bytes"]
    with pytest.raises(InputError, match="counts 4 unplanned bytes"):
        hf_form(tiny_lm_model, Plan.from_dict(data))
