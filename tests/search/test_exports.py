"""Exports: CSV rows, torchao's serialised config, llama.cpp tensor names and types."""

from __future__ import annotations

import csv
import io
import json
import shlex

import pytest

from bitplan.search import exports
from bitplan.search.exports import (
    EXPORTS,
    gguf_name,
    llamacpp_args,
    llamacpp_type,
    plan_to_csv,
    plan_to_llamacpp,
    plan_to_torchao,
    torchao_config,
)
from bitplan.search.plans import Plan, make_plan
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import parse_format
from bitplan.sensitivity.layers import QuantLayer
from tests.runtimes import require_runtime

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


@pytest.mark.parametrize(
    ("fmt", "ggml"),
    [("q4_k", "q4_K"), ("q2_k", "q2_K"), ("q4_1", "q4_1"), ("q5_0", "q5_0"), ("q8_0", "q8_0")],
)
def test_llamacpp_block_formats_map_to_themselves(fmt: str, ggml: str) -> None:
    assert llamacpp_type(parse_format(fmt)) == ggml  # not the k-quant of the same width


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


def _torchao_data(config: dict | None) -> tuple[str, dict] | None:
    """``(class, fields)`` of one serialised config, torch dtypes and enums by name."""
    if config is None:
        return None
    fields = {
        k: v["_data"] if isinstance(v, dict) and "_data" in v else v
        for k, v in config["_data"].items()
    }
    return config["_type"], fields


def test_torchao_mapping_table() -> None:
    layers = [
        _linear("a", D, D),
        _linear("b", D, D),
        _linear("c", D, D),
        _linear("d", D, D),
        _linear("e", D, D),
        _linear("f", D, D),
        QuantLayer(name="emb", param="emb.weight", kind="embedding", shape=(V, D), numel=V * D),
        QuantLayer(name="conv", param="conv.weight", kind="conv2d", shape=(8, 27), numel=216),
        QuantLayer(name="c1d", param="c1d.weight", kind="hf_conv1d", shape=(D, D), numel=D * D),
    ]
    choice = {
        "a": "int4-g32",
        "b": "int8",
        "c": "int3-g16-asym",
        "d": "fp8-e4m3",
        "e": "bf16",
        "f": "int4-g48",  # 48 does not divide 64: torchao needs whole groups
        "emb": "int6-g32",
        "conv": "int8",  # torchao groups conv weights per input channel, bitplan along in·k
        "c1d": "int8",  # transformers' Conv1D stores [in, out]
    }
    envelope = torchao_config(_plan(layers, choice))
    assert (envelope["_type"], envelope["_version"]) == ("FqnToConfig", 1)
    got = {k: _torchao_data(v) for k, v in envelope["_data"]["fqn_to_config"].items()}
    assert got["a"] == (
        "IntxWeightOnlyConfig",
        {
            "weight_dtype": "int4",
            "granularity": {"group_size": 32},
            "mapping_type": "SYMMETRIC_NO_CLIPPING_ERR",
            "scale_dtype": "float16",
        },
    )
    assert got["b"][1]["granularity"] == {"axis": 0}  # one scale a row
    assert got["c"][1]["mapping_type"] == "ASYMMETRIC"
    assert got["c"][1]["weight_dtype"] == "int3"
    assert got["d"] == ("Float8WeightOnlyConfig", {})
    assert got["emb"][0] == "IntxWeightOnlyConfig"
    for unquantized in ("e", "f", "conv", "c1d"):
        assert got[unquantized] is None, unquantized
    gaps = envelope["note"]["layers"]  # quantized, yet left in full precision by torchao
    assert set(gaps) == {"f", "conv", "c1d"}  # "e" is a cast: None is its torchao form
    assert gaps["f"] == "group size 48 does not divide the row length 64"
    assert "conv2d" in gaps["conv"] and "hf_conv1d" in gaps["c1d"]


def test_torchao_export_of_llama_cpp_formats_says_what_torchao_leaves_out(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan in llama.cpp's block formats has no torchao form: every layer maps to null, and
    the export says so (a warning per format, and the note) instead of looking like a valid
    recipe."""
    monkeypatch.setattr(exports, "_WARNED", set())  # nothing warned yet in this process
    layers = [_linear("q", D, V), _linear("up", F, D), _linear("o", D, D)]  # k-quants: 256 cols
    choice = {"q": "q4_k", "up": "q8_0", "o": "fp16"}
    with caplog.at_level("WARNING", logger="bitplan.search.exports"):
        envelope = json.loads(plan_to_torchao(_plan(layers, choice)))
        torchao_config(_plan(layers, choice))  # the same causes again: no more warnings
    assert set(envelope["_data"]["fqn_to_config"].values()) == {None}
    note = envelope["note"]
    assert note["layers"] == {
        "q": "q4_k is a llama.cpp block format, which torchao has no config for",
        "up": "q8_0 is a llama.cpp block format, which torchao has no config for",
    }
    assert note["summary"].startswith("2 quantized layer(s) have no torchao equivalent")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings  # q4_k and q8_0, once each
    assert "maps q to null" in warnings[0] and "q4_k is a llama.cpp block format" in warnings[0]
    assert "note" not in torchao_config(_plan(layers, {"q": "int4", "up": "int8", "o": "fp16"}))


def test_torchao_export_is_what_torchao_itself_serialises() -> None:
    """``config_from_dict`` reads the export into the configs torchao builds from the same
    arguments, and ``quantize_`` applies it to a model with those module names."""
    require_runtime("torchao")
    import torch
    from torch import nn
    from torchao.core.config import config_from_dict, config_to_dict
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        FqnToConfig,
        IntxWeightOnlyConfig,
        PerAxis,
        PerGroup,
        quantize_,
    )
    from torchao.quantization.quant_primitives import MappingType

    layers = [_linear("q", D, D), _linear("k", D, D), _linear("o", D, D), _linear("up", F, D)]
    choice = {"q": "int4-g32", "k": "int2-g16-asym", "o": "fp8-e4m3", "up": "fp16"}
    text = plan_to_torchao(_plan(layers, choice))
    loaded = config_from_dict(json.loads(text))
    expected = FqnToConfig(
        {
            "q": IntxWeightOnlyConfig(
                weight_dtype=torch.int4,
                granularity=PerGroup(32),
                mapping_type=MappingType.SYMMETRIC_NO_CLIPPING_ERR,
                scale_dtype=torch.float16,
            ),
            "k": IntxWeightOnlyConfig(
                weight_dtype=torch.int2,
                granularity=PerGroup(16),
                mapping_type=MappingType.ASYMMETRIC,
                scale_dtype=torch.float16,
            ),
            "o": Float8WeightOnlyConfig(),
            "up": None,
        }
    )
    assert loaded == expected
    assert config_from_dict(config_to_dict(expected)) == loaded
    per_row = torchao_config(_plan([_linear("x", D, D)], {"x": "int8"}))["_data"]["fqn_to_config"]
    assert config_from_dict(per_row["x"]).granularity == PerAxis(0)

    model = nn.ModuleDict({"q": nn.Linear(D, D), "k": nn.Linear(D, D), "o": nn.Linear(D, D)})
    model["up"] = nn.Linear(D, F)
    quantize_(model, loaded, filter_fn=None)
    kinds = {name: type(m.weight).__name__ for name, m in model.items()}
    assert kinds == {
        "q": "IntxUnpackedToInt8Tensor",
        "k": "IntxUnpackedToInt8Tensor",
        "o": "Float8Tensor",
        "up": "Parameter",
    }


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
