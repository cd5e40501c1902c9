"""``bitplan apply --to torchao``: folders that transformers + torchao load, holding bitplan's
exact codes, with the bytes on disk explained layer by layer."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

import bitplan
from bitplan.search import runtime_torchao
from bitplan.search.applier import PlanApplier
from bitplan.search.artifact import tensor_bytes_of
from bitplan.search.plans import Plan, make_plan
from bitplan.search.runtime_torchao import NOTE_FILE, write_torchao
from bitplan.search.targets import TARGETS, target_writer
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import FLOAT_DTYPES, parse_format
from bitplan.sensitivity.layers import find_quant_layers, parameter_bytes
from bitplan.sensitivity.models import LoadedModel, load_model
from tests.helpers import tiny_hf_config

INTX, FLOAT8, PLAIN = "IntxUnpackedToInt8Tensor", "Float8Tensor", "Parameter"

# Tiny LLaMA (hidden 32, MLP 64, vocabulary 96, one KV head of 16): every kind of storage.
# Block 1 is left out of the plan, as an excluded layer would be.
LLAMA_PLAN = {
    "model.embed_tokens": ("int4-g16", INTX),  # an Embedding
    "model.layers.0.self_attn.q_proj": ("int8", INTX),  # per row
    "model.layers.0.self_attn.k_proj": ("int3-g16-asym", INTX),
    "model.layers.0.self_attn.v_proj": ("int2-g32-asym", INTX),
    "model.layers.0.self_attn.o_proj": ("fp8-e4m3", FLOAT8),
    "model.layers.0.mlp.gate_proj": ("bf16", PLAIN),  # a cast, stored in bf16
    "model.layers.0.mlp.up_proj": ("int6-g24", PLAIN),  # 24 does not divide 32: dequantized
    "model.layers.0.mlp.down_proj": ("int5", INTX),
    "lm_head": ("int8-asym", INTX),
}
# Tiny BERT encoder (float32): embeddings and Linear layers of every block. The first parameter
# is cast to fp16, which must not make transformers load the whole model in fp16.
BERT_PLAN = {
    "embeddings.word_embeddings": ("fp16", PLAIN),
    "embeddings.position_embeddings": ("int4-g16", INTX),
    "embeddings.token_type_embeddings": ("int8", INTX),
    "encoder.layer.0.attention.self.query": ("int4-g16", INTX),
    "encoder.layer.0.attention.self.key": ("int3-g32-asym", INTX),
    "encoder.layer.0.intermediate.dense": ("fp8-e4m3", FLOAT8),
    "encoder.layer.1.output.dense": ("int2-g32-asym", INTX),
    "pooler.dense": ("bf16", PLAIN),
}


def _plan(model: LoadedModel, formats: dict[str, str]) -> Plan:
    layers = [lay for lay in model.layers if lay.name in formats]
    unplanned, fp16 = parameter_bytes(model.module, layers)
    return make_plan(
        model_ref=model.ref,
        model_sha256=model.sha256,
        layers=layers,
        choice={lay.group: parse_format(formats[lay.name]) for lay in layers},
        budget=None,
        unplanned_bytes=unplanned,
        fp16_bytes=fp16,
        predicted_error=None,
    )


def _fake_quantized(folder: Path, plan: Plan) -> LoadedModel:
    """bitplan's own fake-quantized model: the reference every loaded weight must equal."""
    ref = load_model(str(folder), device="cpu")
    planned = [lay for lay in ref.layers if lay.name in {p.name for p in plan.layers}]
    with PlanApplier(ref.module, planned) as applier:
        applier.apply(plan.choice())
        values = {n: p.detach().clone() for n, p in ref.module.named_parameters()}
    with torch.no_grad():
        for name, p in ref.module.named_parameters():
            p.copy_(values[name])
    return ref


def _dense(weight: torch.Tensor) -> torch.Tensor:
    return weight.dequantize() if type(weight).__name__ != PLAIN else weight.detach()


def _expected_disk_bytes(model: LoadedModel, plan: Plan, stored: dict[str, str]) -> int:
    """torchao's storage by its rules: an int8 per code, a float16 scale and an int8 zero
    point per group (IntxUnpackedToInt8Tensor); fp8 codes and a float32 scale per row
    (Float8Tensor); a cast at its dtype; a dequantized layer at the model's dtype."""
    total = parameter_bytes(model.module, [lay for lay in model.layers if lay.name in stored])[0]
    for lay in plan.layers:
        fmt, (rows, cols) = lay.format, lay.shape or (0, 0)
        if stored[lay.name] == INTX:
            total += rows * cols + 3 * fmt.n_groups(rows, cols)
        elif stored[lay.name] == FLOAT8:
            total += rows * cols + 4 * rows
        elif fmt.kind == "float":
            total += lay.numel * FLOAT_DTYPES[fmt.name].itemsize
        else:
            dtype = model.module.get_submodule(lay.name).weight.dtype
            total += lay.numel * dtype.itemsize
    return total


def _check_folder(
    out: Path, folder: Path, plan: Plan, table: dict[str, tuple[str, str]], loaded: nn.Module
) -> LoadedModel:
    """Loaded weights are bitplan's fake-quantized ones bit for bit, in the expected storage;
    the bytes on disk are torchao's by its rules; the note names every dequantized layer."""
    stored = {name: storage for name, (_, storage) in table.items()}
    ref = _fake_quantized(folder, plan)
    for name, want in stored.items():
        weight = loaded.get_submodule(name).weight
        assert type(weight).__name__ == want, name
        assert torch.equal(_dense(weight), ref.module.get_submodule(name).weight), name
        if want == INTX:  # codes in the range torchao gives int{b}, as its kernels assume
            bits = int(str(weight.target_dtype).removeprefix("torch.int"))
            for codes in (weight.qdata, weight.zero_point):
                assert -(2 ** (bits - 1)) <= int(codes.min()), name
                assert int(codes.max()) <= 2 ** (bits - 1) - 1, name
    ref_params = dict(ref.module.named_parameters())
    for name, p in loaded.named_parameters():
        if name.removesuffix(".weight") not in stored:  # unplanned: unchanged
            assert torch.equal(p, ref_params[name]), name
    disk = tensor_bytes_of(out / "model.safetensors")
    assert disk == _expected_disk_bytes(ref, plan, stored)
    note = json.loads((out / NOTE_FILE).read_text())
    assert note["plan_total_bytes"] == plan.totals.total_bytes
    assert note["tensor_bytes"] == disk
    reasons = {e["layers"][0]: e["not_torchao_because"] for e in note["layers"]}
    for name, (fmt, storage) in table.items():
        cast = parse_format(fmt).kind == "float"
        assert (reasons[name] is None) == (storage != PLAIN or cast), name
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_folder_loads_in_transformers_with_bitplans_exact_codes(
    tiny_hf_model: Any, tmp_path: Path, dtype: torch.dtype
) -> None:
    folder = tiny_hf_model("llama", task="text-generation", dtype=dtype)
    plan = _plan(load_model(str(folder), device="cpu"), {k: v[0] for k, v in LLAMA_PLAN.items()})
    plan_path = plan.write(tmp_path / "plan.json")
    out = tmp_path / "torchao"
    report = bitplan.apply(model=folder, plan=plan_path, out_dir=out, to="torchao")

    assert report.path == out  # what from_pretrained opens
    assert report.plan_path == out / "plan.json"
    assert report.total_bytes == tensor_bytes_of(out / "model.safetensors")
    assert report.total_bytes == sum(report.tensor_bytes.values())
    assert "model.layers.0.self_attn.q_proj._weight_qdata" in report.tensor_bytes
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == str(dtype).removeprefix("torch.")
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert (out / "tokenizer.json").is_file()  # generation works from the folder alone
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == dtype
    ref = _check_folder(out, folder, plan, LLAMA_PLAN, loaded)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref.module(ids).logits)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    generated = loaded.generate(**tok("the quick brown", return_tensors="pt"), max_new_tokens=4)
    assert generated.shape[1] > 3


def test_bert_encoder_folder_loads_with_exact_outputs(tiny_hf_model: Any, tmp_path: Path) -> None:
    folder = tiny_hf_model("bert", task="feature-extraction")
    plan = _plan(load_model(str(folder), device="cpu"), {k: v[0] for k, v in BERT_PLAN.items()})
    out = tmp_path / "torchao"
    bitplan.apply(model=folder, plan=plan, out_dir=out, to="torchao")
    loaded = transformers.AutoModel.from_pretrained(out)
    assert loaded.dtype == torch.float32
    ref = _check_folder(out, folder, plan, BERT_PLAN, loaded)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = loaded(input_ids=ids), ref.module(input_ids=ids)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    assert torch.equal(got.pooler_output, want.pooler_output)


def test_tied_embeddings_stay_tied_and_exact(tmp_path: Path) -> None:
    """A torchao tensor shared by two modules does not load in transformers; the tie group is
    stored once, dequantized, and named in the note."""
    config = tiny_hf_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    folder = tmp_path / "tied"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    model = load_model(str(folder), device="cpu")
    plan = _plan(model, {"model.embed_tokens": "int4-g16", "lm_head": "int4-g16"})
    out = tmp_path / "torchao"
    write_torchao(model=model, plan=plan, out_dir=out)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ref = _fake_quantized(folder, plan)
    assert torch.equal(loaded.lm_head.weight, ref.module.lm_head.weight)
    note = json.loads((out / NOTE_FILE).read_text())
    (entry,) = note["layers"]
    assert entry["layers"] == ["model.embed_tokens", "lm_head"]
    assert "tied to lm_head" in entry["not_torchao_because"]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_builtin_models_are_refused_with_the_reason(tmp_path: Path) -> None:
    """A builtin model is a plain torch module (here one like it, to skip its training)."""
    module = nn.Sequential(nn.Linear(8, 8))
    model = LoadedModel(
        ref="builtin:tiny-lm",
        sha256="0" * 64,
        module=module,
        task="text-generation",
        layers=find_quant_layers(module),
        tokenizer=None,
        device=torch.device("cpu"),
    )
    plan = _plan(model, {"0": "int8"})
    with pytest.raises(InputError, match="is not a transformers model; use --to bitplan"):
        write_torchao(model=model, plan=plan, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_target_lists_the_targets(tmp_path: Path) -> None:
    """Refused before the plan or the model is read."""
    with pytest.raises(InputError, match=r"unknown target 'nope'; accepted: bitplan, torchao\b"):
        bitplan.apply(model="nowhere", plan=tmp_path / "p.json", out_dir=tmp_path, to="nope")
    assert {"bitplan", "torchao"} <= set(TARGETS)


def test_a_plan_for_other_weights_is_refused(tiny_hf_model: Any, tmp_path: Path) -> None:
    model = load_model(str(tiny_hf_model("llama", task="text-generation")), device="cpu")
    other = load_model(str(tiny_hf_model("llama", task="text-generation", seed=1)), device="cpu")
    with pytest.raises(InputError, match="the plan was made for model sha256"):
        write_torchao(model=model, plan=_plan(other, {"lm_head": "int8"}), out_dir=tmp_path)


def test_failure_leaves_nothing_and_reuse_drops_stale_weights(
    tiny_hf_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reusing a folder drops only the weight files transformers would read as the model's;
    other files, other safetensors included, are someone else's and stay."""
    folder = tiny_hf_model("llama", task="text-generation")
    plan = _plan(load_model(str(folder), device="cpu"), {"lm_head": "int4-g32"})
    out = tmp_path / "work" / "out"
    out.mkdir(parents=True)
    stale = out / "model-00002-of-00002.safetensors"  # an earlier, sharded write
    stale.write_bytes(b"x")
    theirs = [out / "adapter_model.safetensors", out / "model-fp32-backup.safetensors"]
    for path in theirs:
        path.write_bytes(b"not ours")

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as mp:
        mp.setattr(transformers.PreTrainedModel, "save_pretrained", broken)
        with pytest.raises(OSError, match="disk full"):
            bitplan.apply(model=folder, plan=plan, out_dir=out, to="torchao")
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no partial folder left
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in [stale, *theirs])

    bitplan.apply(model=folder, plan=plan, out_dir=out, to="torchao")
    assert not stale.exists()
    assert all(path.read_bytes() == b"not ours" for path in theirs)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded.lm_head.weight).__name__ == INTX
    assert runtime_torchao.NOTE_FILE in {p.name for p in out.iterdir()}


def test_missing_torchao_is_an_install_hint_before_anything_changes(
    tiny_hf_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the runtimes extra the target is refused before the model is loaded or changed,
    even where this module was imported before."""
    folder = tiny_hf_model("llama", task="text-generation")
    plan = _plan(load_model(str(folder), device="cpu"), {"lm_head": "int4-g32"})
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao now fails
    hint = r"`--to torchao` needs the runtime packages: pip install 'bitplan\[runtimes\]'"
    with pytest.raises(InputError, match=hint):
        target_writer("torchao")
    with pytest.raises(InputError, match=hint):
        bitplan.apply(model=folder, plan=plan, out_dir=tmp_path / "out", to="torchao")
    assert not (tmp_path / "out").exists()
