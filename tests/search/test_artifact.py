"""The packed artifact: exact bytes, bit-equal reload, tied weights, buffers, and bad input."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from torch import nn

import bitplan
from bitplan.search import artifact
from bitplan.search.artifact import apply_plan, load_artifact, tensor_bytes_of, write_artifact
from bitplan.search.plans import Plan, make_plan, read_plan
from bitplan.search.targets import TARGETS
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import QuantFormat, fake_quantize, parse_format, tensor_bytes
from bitplan.sensitivity.layers import (
    QuantLayer,
    find_quant_layers,
    get_weight,
    parameter_bytes,
    weight_matrix,
)
from bitplan.sensitivity.models import load_model
from tests.helpers import uniform_plan
from tests.runtimes import require_runtime

VOCAB, DIM = 37, 45  # odd sizes: every group format below gets a short last group

# One format per layer; the embedding and the tied head share int8.
MIXED = {
    "embed": "int8",
    "head": "int8",
    "up": "int4-g32",
    "conv": "int3-g16-asym",
    "down": "int2-g8-asym",
    "mix": "int5-g64",
    "proj": "int6",
    "gate": "fp8-e4m3",
    "out": "fp16",
}


class Mixed(nn.Module):
    """Embedding → Linear → Conv2d → Linear … → head tied to the embedding, with a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.up = nn.Linear(DIM, 70)
        self.conv = nn.Conv2d(70, 24, kernel_size=(3, 1), padding=(1, 0))  # matrix [24, 210]
        self.norm = nn.BatchNorm1d(24)
        self.down = nn.Linear(24, 33, bias=False)
        self.mix = nn.Linear(33, DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.gate = nn.Linear(DIM, DIM)
        self.out = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.up(self.embed(input_ids))  # (B, T, 70)
        x = self.conv(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1)  # (B, 24, T)
        x = self.down(self.norm(x).transpose(1, 2))  # (B, T, 33)
        x = torch.tanh(self.mix(x))
        x = self.out(torch.relu(self.gate(self.proj(x))))
        return self.head(x)  # (B, T, VOCAB)


def _fake_quantized(model: nn.Module, layers: list[QuantLayer], formats: dict[str, str]) -> None:
    """The reference: fake-quantize every planned tensor in place (a tied tensor once)."""
    done: set[str] = set()
    with torch.no_grad():
        for lay in layers:
            if lay.param not in done:
                done.add(lay.param)
                view = weight_matrix(get_weight(model, lay).data, lay.kind)
                fake_quantize(view, parse_format(formats[lay.name]), out=view)


def _expected_bytes(model: nn.Module, layers: list[QuantLayer], formats: dict[str, str]) -> int:
    planned = {
        lay.param: tensor_bytes(parse_format(formats[lay.name]), *lay.shape) for lay in layers
    }
    return sum(planned.values()) + parameter_bytes(model, layers)[0]


def _parsed(formats: dict[str, str]) -> dict[str, QuantFormat]:
    """The tests name formats; the writer takes them parsed."""
    return {name: parse_format(fmt) for name, fmt in formats.items()}


def _plan(model: nn.Module, layers: list[QuantLayer], *, extra_bytes: int = 0) -> Plan:
    """MIXED as a plan of ``model`` (``extra_bytes`` more unplanned bytes than it has)."""
    unplanned, fp16 = parameter_bytes(model, layers)
    return make_plan(
        model_ref="builtin:test",
        model_sha256="ab" * 32,
        layers=layers,
        choice={lay.group: parse_format(MIXED[lay.name]) for lay in layers},
        budget=None,
        unplanned_bytes=unplanned + extra_bytes,
        fp16_bytes=fp16,
        predicted_error=None,
    )


def _trained(seed: int, dtype: torch.dtype = torch.float32) -> Mixed:
    torch.manual_seed(seed)
    model = Mixed()
    model.train()
    model(torch.randint(0, VOCAB, (4, 7)))  # moves the BatchNorm statistics off their defaults
    return model.eval().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 50])  # 50: many row chunks per layer
def test_reload_is_bit_equal_and_bytes_match_the_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, chunk: int | None
) -> None:
    if chunk is not None:
        monkeypatch.setattr(artifact, "_CHUNK_ELEMENTS", chunk)
    model = _trained(0, dtype)
    layers = find_quant_layers(model)
    assert {lay.name for lay in layers} == set(MIXED)
    assert sum(lay.tie is not None for lay in layers) == 2
    report = write_artifact(
        model=model,
        layers=layers,
        formats=_parsed(MIXED),
        out_dir=tmp_path,
        model_ref="builtin:test",
    )
    expected = _expected_bytes(model, layers, MIXED)
    assert tensor_bytes_of(report.path) == report.total_bytes == expected
    assert report.tensor_bytes["up.weight.qdata"] == math.ceil(70 * DIM * 4 / 8)  # 2 a byte
    assert report.tensor_bytes["up.weight.scales"] == 2 * 70 * 2  # 2 groups a row, fp16

    x = torch.randint(0, VOCAB, (3, 5))
    _fake_quantized(model, layers, MIXED)
    want = model(x)
    fresh = _trained(1, dtype)
    assert not torch.equal(fresh(x), want)
    loaded = load_artifact(tmp_path, fresh)
    assert loaded is fresh
    assert torch.equal(fresh(x), want)
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.norm.running_mean, model.norm.running_mean)


def test_file_layout(tmp_path: Path) -> None:
    model = _trained(0)
    layers = find_quant_layers(model)
    report = write_artifact(model=model, layers=layers, formats=_parsed(MIXED), out_dir=tmp_path)
    size = report.path.stat().st_size
    with report.path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    assert tensor_bytes_of(report.path) == size - 8 - header_len
    with safe_open(str(report.path), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("gate.weight.qdata").dtype == torch.float8_e4m3fn
        assert tuple(f.get_tensor("gate.weight.scales").shape) == (DIM, 1)
        assert f.get_tensor("out.weight").dtype == torch.float16
        assert f.get_tensor("conv.weight.scales").shape == (24, 14)  # ceil(210 / 16)
        meta = json.loads(f.metadata()["conv.weight"])
    assert meta == {
        "format": "int3-g16-asym",
        "rounding": "rtn",
        "kind": "conv2d",
        "shape": [24, 70, 3, 1],
        "rows": 24,
        "cols": 210,
        "dtype": "float32",
    }
    assert "head.weight" not in names and "head.weight.qdata" not in names  # tied: stored once
    assert {"up.bias", "norm.weight", "embed.weight.qdata"} <= names
    with safe_open(str(tmp_path / "buffers.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {
            "norm.running_mean",
            "norm.running_var",
            "norm.num_batches_tracked",
        }


def test_gpt2_conv1d_round_trip(tmp_path: Path) -> None:
    import transformers

    config = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=40, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    layers = find_quant_layers(model)
    assert {lay.kind for lay in layers} >= {"hf_conv1d", "embedding"}
    cycle = ["int4-g32", "int3-g16-asym", "int5-g64", "int2-g8-asym", "int6", "fp8-e4m3"]
    formats = {lay.name: cycle[i % len(cycle)] for i, lay in enumerate(layers) if lay.tie is None}
    formats.update({lay.name: "int8" for lay in layers if lay.tie is not None})
    write_artifact(model=model, layers=layers, formats=_parsed(formats), out_dir=tmp_path)
    assert tensor_bytes_of(tmp_path / "model.safetensors") == _expected_bytes(
        model, layers, formats
    )
    x = torch.randint(0, 61, (2, 9))
    _fake_quantized(model, layers, formats)
    want = model(input_ids=x).logits
    torch.manual_seed(1)
    fresh = transformers.GPT2LMHeadModel(config).eval()
    load_artifact(tmp_path, fresh)
    assert torch.equal(fresh(input_ids=x).logits, want)


def test_formats_are_validated(tmp_path: Path) -> None:
    model = _trained(0)
    layers = find_quant_layers(model)
    with pytest.raises(InputError, match="no format for layer up"):
        write_artifact(
            model=model,
            layers=layers,
            formats=_parsed({k: v for k, v in MIXED.items() if k != "up"}),
            out_dir=tmp_path,
        )
    with pytest.raises(InputError, match="different formats"):
        write_artifact(
            model=model, layers=layers, formats=_parsed({**MIXED, "head": "int4"}), out_dir=tmp_path
        )
    with pytest.raises(InputError, match="does not plan: nope"):
        write_artifact(
            model=model, layers=layers, formats=_parsed({**MIXED, "nope": "int8"}), out_dir=tmp_path
        )
    only_embed = {k: v for k, v in MIXED.items() if k != "head"}  # one tie member is enough
    report = write_artifact(
        model=model, layers=layers, formats=_parsed(only_embed), out_dir=tmp_path
    )
    assert report.tensor_bytes["embed.weight.qdata"] == VOCAB * DIM  # int8: a byte each


class _Wider(Mixed):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(DIM, DIM + 1)
        self.gate = nn.Linear(DIM + 1, DIM)


class _Extra(Mixed):
    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(2, 2)


class _Untied(Mixed):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(DIM, VOCAB, bias=False)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (_Wider, "proj.weight has shape"),
        (_Extra, "lacks tensors the model needs: extra.bias, extra.weight"),
        (_Untied, "lacks tensors the model needs: head.weight"),
        (nn.Linear(3, 3), "has tensors the model does not have"),
    ],
)
def test_load_rejects_other_architectures(tmp_path: Path, target: object, message: str) -> None:
    model = _trained(0)
    write_artifact(
        model=model, layers=find_quant_layers(model), formats=_parsed(MIXED), out_dir=tmp_path
    )
    module = target() if isinstance(target, type) else target
    with pytest.raises(InputError, match=message):
        load_artifact(tmp_path, module)


def test_load_rejects_missing_or_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no model.safetensors"):
        load_artifact(tmp_path, Mixed())
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(InputError, match="not a readable safetensors"):
        load_artifact(tmp_path, Mixed())
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(InputError, match="not a bitplan artifact"):
        load_artifact(tmp_path, Mixed())


def test_apply_plan_checks_model_and_bytes(tmp_path: Path) -> None:
    model = _trained(0)
    layers = find_quant_layers(model)
    total = _expected_bytes(model, layers, MIXED)
    plan = _plan(model, layers)
    assert plan.totals.total_bytes == total
    loaded = SimpleNamespace(module=model, layers=layers, sha256="ab" * 32, ref="builtin:test")
    with pytest.raises(InputError, match="plan was made for model"):
        apply_plan(
            model=SimpleNamespace(**{**vars(loaded), "sha256": "cd" * 32}),
            plan=plan,
            out_dir=tmp_path / "a",
        )
    with pytest.raises(InputError, match=f"says {total + 1} bytes but this model packs to {total}"):
        apply_plan(model=loaded, plan=_plan(model, layers, extra_bytes=1), out_dir=tmp_path / "b")
    assert not (tmp_path / "b").exists()
    report = apply_plan(model=loaded, plan=plan, out_dir=tmp_path / "d")
    assert report.total_bytes == total
    assert read_plan(tmp_path / "d" / "plan.json") == plan


def test_rewrite_into_the_same_folder_drops_stale_files(tmp_path: Path) -> None:
    model = _trained(0)
    write_artifact(
        model=model,
        layers=find_quant_layers(model),
        formats=_parsed(MIXED),
        out_dir=tmp_path,
        plan=_plan(model, find_quant_layers(model)),
    )
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(20, 9), nn.ReLU(), nn.Linear(9, 3))
    layers = find_quant_layers(small)
    report = write_artifact(
        model=small,
        layers=layers,
        out_dir=tmp_path,
        formats=_parsed({"0": "int4-g8", "2": "int2-g4-asym"}),
    )
    assert Path(report) == tmp_path / "model.safetensors"
    assert report.plan_path is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    x = torch.randn(4, 20)
    _fake_quantized(small, layers, {"0": "int4-g8", "2": "int2-g4-asym"})
    torch.manual_seed(5)
    fresh = load_artifact(tmp_path, nn.Sequential(nn.Linear(20, 9), nn.ReLU(), nn.Linear(9, 3)))
    assert torch.equal(fresh(x), small(x))


class _GgmlMix(nn.Module):
    """Rows that llama.cpp's blocks fit: 256-weight rows (k-quants) and 64/96 (legacy), a tied
    embedding/head in q6_k, and bitplan's own formats mixed in."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 256)
        self.down = nn.Linear(256, 64)
        self.mid = nn.Linear(64, 96)
        self.up = nn.Linear(96, 256, bias=False)
        self.side = nn.Linear(256, 256)
        self.head = nn.Linear(256, 40, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.down(self.embed(input_ids)))  # (B, T, 64)
        x = self.up(torch.tanh(self.mid(x)))  # (B, T, 256)
        return self.head(self.side(x))  # (B, T, 40)


GGML_MIX = {
    "embed": "q6_k",
    "head": "q6_k",
    "down": "q4_k",
    "mid": "q5_1",
    "up": "int4-g32",
    "side": "q2_k",
}


def test_ggml_blocks_are_stored_verbatim_and_bytes_match_the_plan(tmp_path: Path) -> None:
    gguf = require_runtime("gguf")  # its dequantizer reads the blocks, as llama.cpp would

    torch.manual_seed(0)
    model = _GgmlMix().eval()
    layers = find_quant_layers(model)
    plan = make_plan(
        model_ref="builtin:test",
        model_sha256="ab" * 32,
        layers=layers,
        choice={lay.group: parse_format(GGML_MIX[lay.name]) for lay in layers},
        budget=None,
        unplanned_bytes=parameter_bytes(model, layers)[0],
        fp16_bytes=parameter_bytes(model, layers)[1],
        predicted_error=None,
    )
    loaded = SimpleNamespace(module=model, layers=layers, sha256="ab" * 32, ref="builtin:test")
    report = apply_plan(model=loaded, plan=plan, out_dir=tmp_path)
    assert tensor_bytes_of(report.path) == report.total_bytes == plan.totals.total_bytes
    assert report.tensor_bytes["down.weight.qdata"] == 64 * 144  # one q4_K super-block a row
    assert "down.weight.scales" not in report.tensor_bytes  # the scales live in the blocks

    x = torch.randint(0, 40, (2, 5))
    originals = {lay.param: get_weight(model, lay).detach().clone() for lay in layers}
    _fake_quantized(model, layers, GGML_MIX)
    with safe_open(str(report.path), framework="pt") as f:
        for name, fmt in (("down", "q4_k"), ("mid", "q5_1"), ("embed", "q6_k"), ("side", "q2_k")):
            blocks = f.get_tensor(f"{name}.weight.qdata")
            assert blocks.dtype == torch.uint8 and blocks.dim() == 2
            qtype = gguf.GGMLQuantizationType[fmt.upper()]
            # what llama.cpp reads from these bytes is what bitplan measured
            read = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), qtype))
            assert torch.equal(read, getattr(model, name).weight.detach())
            assert not torch.equal(read, originals[f"{name}.weight"])
    want = model(x)
    torch.manual_seed(1)
    fresh = _GgmlMix().eval()
    load_artifact(tmp_path, fresh)
    assert torch.equal(fresh(x), want)
    assert fresh.head.weight is fresh.embed.weight


@pytest.mark.parametrize("to", list(TARGETS))
def test_no_target_writes_into_the_models_own_folder(
    tiny_hf_model: Callable[..., Path], tmp_path: Path, to: str
) -> None:
    """``-o`` naming the model's folder (however spelled) is refused before anything is read:
    every target writes ``model.safetensors`` or shards there, which would replace the model."""
    folder = tiny_hf_model("llama", task="text-generation")
    model = load_model(str(folder), device="cpu")
    plan = uniform_plan(model, "int8")
    plan_path = plan.write(tmp_path / "plan.json")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(InputError, match="the output folder is the model's own folder"):
        bitplan.apply(
            model=folder, plan=plan_path, out_dir=folder.parent / "." / folder.name, to=to
        )
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
