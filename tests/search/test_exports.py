"""Exports: CSV rows, the torchao mapping and code, llama.cpp tensor names and types."""

from __future__ import annotations

import csv
import io
import json
import shlex

import pytest

from bitplan.search.exports import (
    EXPORTS,
    gguf_name,
    llamacpp_args,
    plan_to_csv,
    plan_to_llamacpp,
    plan_to_torchao,
    torchao_config,
)
from bitplan.search.plans import Plan, make_plan
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import parse_format
from bitplan.sensitivity.layers import QuantLayer

D, F, V = 64, 128, 256  # hidden, MLP and vocabulary sizes of the toy models


def _plan(layers: list[QuantLayer], choice: dict[str, str]) -> Plan:
    """A plan of ``layers``; ``choice`` is given by format names."""
    return make_plan(
        model_ref="toy",
        model_sha256="0" * 64,
        layers=layers,
        choice={group: parse_format(name) for group, name in choice.items()},
        budget=None,
        unplanned_bytes=0,
        fp16_bytes=10**6,
        predicted_error=0.0,
    )


def _linear(name: str, rows: int, cols: int, **kw) -> QuantLayer:
    return QuantLayer(
        name=name,
        param=f"{name}.weight",
        kind="linear",
        shape=(rows, cols),
        numel=rows * cols,
        **kw,
    )


def _llama() -> tuple[list[QuantLayer], dict[str, str]]:
    layers = [
        QuantLayer(
            name="model.embed_tokens",
            param="model.embed_tokens.weight",
            kind="embedding",
            shape=(V, D),
            numel=V * D,
        )
    ]
    formats = {
        "q_proj": "int4-g64",
        "k_proj": "int8",
        "v_proj": "int6-g64",
        "o_proj": "int5-g32",
        "gate_proj": "int3-g64",
        "up_proj": "int2-g32-asym",
        "down_proj": "bf16",
    }
    choice = {"model.embed_tokens": "fp16", "lm_head": "fp32"}
    for block in (0, 11):
        for proj, fmt in formats.items():
            part = "self_attn" if proj[0] in "qkvo" else "mlp"
            name = f"model.layers.{block}.{part}.{proj}"
            layers.append(_linear(name, D, D))
            choice[name] = fmt
    layers.append(_linear("lm_head", V, D))
    return layers, choice


def test_csv_has_one_row_a_layer() -> None:
    layers, choice = _llama()
    rows = list(csv.DictReader(io.StringIO(plan_to_csv(_plan(layers, choice)))))
    assert [r["name"] for r in rows] == [lay.name for lay in layers]
    q = rows[1]
    assert (q["format"], q["bits"], q["group_size"], q["rows"], q["cols"]) == (
        "int4-g64",
        "4",
        "64",
        str(D),
        str(D),
    )
    assert int(q["bytes"]) == _plan(layers, choice).layers[1].bytes


def test_llamacpp_llama_names_and_types() -> None:
    layers, choice = _llama()
    args = llamacpp_args(_plan(layers, choice))
    pairs = dict(a.split("=") for a in args[1::2])
    assert set(args[0::2]) == {"--tensor-type"}
    assert pairs[r"token_embd\.weight"] == "f16"
    assert pairs[r"output\.weight"] == "f32"
    assert pairs[r"blk\.11\.attn_q\.weight"] == "q4_K"
    assert pairs[r"blk\.11\.attn_k\.weight"] == "q8_0"
    assert pairs[r"blk\.0\.attn_v\.weight"] == "q6_K"
    assert pairs[r"blk\.0\.attn_output\.weight"] == "q5_K"
    assert pairs[r"blk\.0\.ffn_gate\.weight"] == "q3_K"
    assert pairs[r"blk\.0\.ffn_up\.weight"] == "q2_K"
    assert pairs[r"blk\.0\.ffn_down\.weight"] == "bf16"
    assert len(pairs) == 2 + 14
    text = plan_to_llamacpp(_plan(layers, choice))
    assert shlex.split(text.replace("\\\n", " ")) == args


def test_llamacpp_gpt2_names_and_tie_once() -> None:
    wte = QuantLayer(
        name="transformer.wte",
        param="transformer.wte.weight",
        kind="embedding",
        shape=(V, D),
        numel=V * D,
        tie="transformer.wte.weight",
    )
    head = QuantLayer(
        name="lm_head",
        param="transformer.wte.weight",
        kind="linear",
        shape=(V, D),
        numel=V * D,
        tie="transformer.wte.weight",
    )
    conv = [
        QuantLayer(
            name=f"transformer.h.3.{n}",
            param=f"transformer.h.3.{n}.weight",
            kind="hf_conv1d",
            shape=(r, c),
            numel=r * c,
        )
        for n, r, c in (
            ("attn.c_attn", 3 * D, D),
            ("attn.c_proj", D, D),
            ("mlp.c_fc", F, D),
            ("mlp.c_proj", D, F),
        )
    ]
    choice = {"transformer.wte.weight": "int8", **{c.name: "int4-g32" for c in conv}}
    pairs = dict(a.split("=") for a in llamacpp_args(_plan([head, *conv, wte], choice))[1::2])
    assert pairs == {
        r"token_embd\.weight": "q8_0",
        r"blk\.3\.attn_qkv\.weight": "q4_K",
        r"blk\.3\.attn_output\.weight": "q4_K",
        r"blk\.3\.ffn_up\.weight": "q4_K",
        r"blk\.3\.ffn_down\.weight": "q4_K",
    }
    assert gguf_name("h.0.attn.c_attn") == "blk.0.attn_qkv"
    assert gguf_name("transformer.wpe") == "position_embd"


def test_llamacpp_errors_name_the_problem() -> None:
    layers, choice = _llama()
    with pytest.raises(InputError, match="no fp8-e4m3 type"):
        llamacpp_args(_plan(layers, {**choice, "lm_head": "fp8-e4m3"}))
    odd = [_linear("encoder.block.0.dense", D, D), _linear("classifier", 10, D)]
    with pytest.raises(InputError, match="cannot name tensor encoder.block.0.dense"):
        llamacpp_args(_plan(odd, {"encoder.block.0.dense": "int8", "classifier": "int8"}))


def test_torchao_mapping_table() -> None:
    layers = [
        _linear("a", D, D),
        _linear("b", D, D),
        _linear("c", D, D),
        _linear("d", D, D),
        _linear("e", D, D),
        _linear("f", D, D),
        QuantLayer(name="emb", param="emb.weight", kind="embedding", shape=(V, D), numel=V * D),
    ]
    choice = {
        "a": "int4-g128",
        "b": "int8",
        "c": "int3-g64-asym",
        "d": "fp8-e4m3",
        "e": "bf16",
        "f": "int4-g100",
        "emb": "int4-g32",
    }
    config = torchao_config(_plan(layers, choice))
    assert config["a"] == {"config": "Int4WeightOnlyConfig", "kwargs": {"group_size": "128"}}
    assert config["b"] == {"config": "Int8WeightOnlyConfig", "kwargs": {}}
    assert config["c"] == {
        "config": "IntxWeightOnlyConfig",
        "kwargs": {
            "weight_dtype": "torch.int3",
            "granularity": "PerGroup(64)",
            "mapping_type": "MappingType.ASYMMETRIC",
        },
    }
    assert config["d"] == {"config": "Float8WeightOnlyConfig", "kwargs": {}}
    assert config["e"] is None
    assert config["f"]["config"] == "IntxWeightOnlyConfig"  # 100 is no tinygemm group size
    assert config["emb"]["config"] == "IntxWeightOnlyConfig"  # Int4 kernels are Linear-only
    layers_int8 = [QuantLayer(name="x", param="x.weight", kind="conv2d", shape=(8, 27), numel=216)]
    assert (
        torchao_config(_plan(layers_int8, {"x": "int8"}))["x"]["kwargs"]["granularity"]
        == "PerAxis(0)"
    )


def test_torchao_text_is_json_with_runnable_looking_code() -> None:
    layers, choice = _llama()
    doc = json.loads(plan_to_torchao(_plan(layers, choice)))
    assert (
        doc["fqn_to_config"]["model.layers.0.self_attn.q_proj"]["config"] == "Int4WeightOnlyConfig"
    )
    code = doc["code"]
    compile(code, "<torchao>", "exec")  # valid Python
    assert "'model.layers.0.self_attn.q_proj': Int4WeightOnlyConfig(group_size=64)," in code
    assert "'model.embed_tokens': None," in code
    assert "from torchao.quantization import FqnToConfig, quantize_, Int4WeightOnlyConfig" in code


def test_every_registered_export_matches_its_media_type_and_file_name() -> None:
    """The registry the API and the report both read: each export's text is what its media type
    says, and each has its own offline file name."""
    plan = _plan(*_llama())
    for name, export in EXPORTS.items():
        assert name == export.name
        text = plan.to_json() if export.render is None else export.render(plan)
        if export.media_type == "application/json":
            json.loads(text)
        elif export.media_type == "text/csv":
            assert len(list(csv.DictReader(io.StringIO(text)))) == len(plan.layers)
        else:
            assert export.media_type == "text/plain" and text.endswith("\n")
    assert len({e.suffix for e in EXPORTS.values()}) == len(EXPORTS)
    assert EXPORTS["json"].render is None  # the plan file itself, served as written
