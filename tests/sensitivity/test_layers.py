"""Layer discovery, tie and share groups, exclusions, pins and in-place quantization with
restore."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import fake_quantize, parse_format
from bitplan.sensitivity.fusion import fuse_layers
from bitplan.sensitivity.layers import (
    apply_pins,
    find_quant_layers,
    parameter_bytes,
    quantized,
    weight_matrix,
)


class TinyNet(nn.Module):
    """Every layer kind bitplan plans, plus a head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 6, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(1, 4, kernel_size=3)
        self.proj = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids).transpose(1, 2)  # (B, 8, T)
        x = self.conv(x).transpose(1, 2)  # (B, T, 6)
        return self.head(self.norm(self.proj(x)))


def test_finds_every_kind_with_matrix_shapes_and_tie_group() -> None:
    layers = {lay.name: lay for lay in find_quant_layers(TinyNet())}
    assert list(layers) == ["emb", "conv", "conv2", "proj", "head"]
    assert layers["conv"].shape == (6, 24) and layers["conv"].kind == "conv1d"
    assert layers["conv2"].shape == (4, 9) and layers["conv2"].numel == 36
    assert layers["emb"].tie == layers["head"].tie == "emb.weight"
    assert layers["head"].param == "emb.weight" and layers["head"].group == "emb.weight"
    assert layers["proj"].tie is None and layers["proj"].group == "proj"


def test_exclude_patterns_and_tied_exclusion() -> None:
    names = [lay.name for lay in find_quant_layers(TinyNet(), exclude=["conv*"])]
    assert names == ["emb", "proj", "head"]
    names = [lay.name for lay in find_quant_layers(TinyNet(), exclude=["head"])]
    assert names == ["conv", "conv2", "proj"]  # the head's tensor is the embedding's


def test_pins_cover_tie_groups_and_reject_conflicts_and_typos() -> None:
    layers = apply_pins(find_quant_layers(TinyNet()), {"head": "int8", "conv*": "int4-g8"})
    pinned = {lay.name: lay.pinned for lay in layers}
    assert pinned == {
        "emb": "int8",
        "conv": "int4-g8",
        "conv2": "int4-g8",
        "proj": None,
        "head": "int8",
    }
    with pytest.raises(ValueError, match="pinned to both"):
        apply_pins(find_quant_layers(TinyNet()), {"emb": "int8", "head": "int4"})
    with pytest.raises(ValueError, match="matches no quantizable layer"):
        apply_pins(find_quant_layers(TinyNet()), {"decoder.*": "int8"})
    with pytest.raises(ValueError, match="accepted"):
        apply_pins(find_quant_layers(TinyNet()), {"proj": "int7"})


def test_quantized_changes_weight_then_restores_it() -> None:
    model = TinyNet()
    conv = next(lay for lay in find_quant_layers(model) if lay.name == "conv")
    before = model.conv.weight.detach().clone()
    fmt = parse_format("int2-g8-asym")
    with quantized(model, conv, fmt):
        expect = fake_quantize(before.view(6, -1), fmt).view_as(before)  # (out, in, k)
        assert torch.equal(model.conv.weight, expect)
    assert torch.equal(model.conv.weight, before)


def test_quantized_restores_after_an_error() -> None:
    model = TinyNet()
    proj = next(lay for lay in find_quant_layers(model) if lay.name == "proj")
    before = model.proj.weight.detach().clone()
    with pytest.raises(RuntimeError), quantized(model, proj, "int2"):
        raise RuntimeError("boom")
    assert torch.equal(model.proj.weight, before)


def test_weight_matrix_views_write_through() -> None:
    w = torch.zeros(3, 5)  # stored (in, out) like transformers' Conv1D
    weight_matrix(w, "hf_conv1d")[1, 2] = 7.0  # (out, in)
    assert w[2, 1] == 7.0


def test_parameter_bytes_counts_unplanned_and_ties_once() -> None:
    model = TinyNet()
    layers = find_quant_layers(model)
    unplanned, fp16 = parameter_bytes(model, layers)
    bias_and_norm = (6 + 4 + 8 + 8 + 8) * 4  # conv, conv2, proj biases, norm weight + bias
    assert unplanned == bias_and_norm
    total = sum(p.numel() for p in model.parameters())
    assert fp16 == 2 * total
    unplanned2, _ = parameter_bytes(model, [lay for lay in layers if lay.name != "proj"])
    assert unplanned2 == bias_and_norm + 48 * 4


class _Block(nn.Module):
    """A LLaMA-style block (q/k/v/o, gate/up/down), a BERT-style attention and an LFM2-style
    w1/w2/w3 MLP: every naming the fusion rules know, with a k/v smaller than q (grouped
    queries)."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.ModuleDict(
            {
                n: nn.Linear(8, 4 if n in ("k_proj", "v_proj") else 8)
                for n in ("q_proj", "k_proj", "v_proj", "o_proj")
            }
        )
        self.mlp = nn.ModuleDict(
            {
                "gate_proj": nn.Linear(8, 16),
                "up_proj": nn.Linear(8, 16),
                "down_proj": nn.Linear(16, 8),
            }
        )
        self.bert = nn.ModuleDict({n: nn.Linear(8, 8) for n in ("query", "key", "value")})
        self.feed_forward = nn.ModuleDict({n: nn.Linear(8, 16) for n in ("w1", "w2", "w3")})


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])


def test_fuse_rules_group_siblings_of_one_module() -> None:
    layers = fuse_layers(find_quant_layers(_Model()), ["qkv", "gate_up"])
    share = {lay.name: lay.share for lay in layers}
    for i in (0, 1):
        for n in ("q_proj", "k_proj", "v_proj"):
            assert share[f"layers.{i}.self_attn.{n}"] == f"layers.{i}.self_attn.qkv"
        for n in ("query", "key", "value"):
            assert share[f"layers.{i}.bert.{n}"] == f"layers.{i}.bert.qkv"
        for n in ("gate_proj", "up_proj"):
            assert share[f"layers.{i}.mlp.{n}"] == f"layers.{i}.mlp.gate_up"
        assert share[f"layers.{i}.feed_forward.w1"] == share[f"layers.{i}.feed_forward.w3"]
        for n in ("self_attn.o_proj", "mlp.down_proj", "feed_forward.w2"):
            assert share[f"layers.{i}.{n}"] is None
    by_name = {lay.name: lay for lay in layers}
    k = by_name["layers.0.self_attn.k_proj"]
    assert k.group == "layers.0.self_attn.qkv" and k.tensor_key == k.name  # its own tensor
    assert k.shape == (4, 8)  # nothing but the group changes
    only_qkv = {lay.name: lay.share for lay in fuse_layers(find_quant_layers(_Model()), ["qkv"])}
    assert only_qkv["layers.0.mlp.up_proj"] is None


def test_fuse_groups_what_is_left_after_exclusions(caplog: pytest.LogCaptureFixture) -> None:
    layers = find_quant_layers(_Model(), exclude=["*.v_proj", "*.up_proj"])
    with caplog.at_level("WARNING"):
        share = {lay.name: lay.share for lay in fuse_layers(layers, ["qkv", "gate_up"])}
    assert share["layers.0.self_attn.q_proj"] == share["layers.0.self_attn.k_proj"] is not None
    assert share["layers.0.mlp.gate_proj"] is None  # alone: nothing to share a format with
    # q+k without v is no fused qkv weight: a runtime that fuses q/k/v cannot serve the plan.
    assert "fuse qkv: 2 share groups lack a member (excluded or absent)" in caplog.text
    assert "layers.0.self_attn.qkv (layers.0.self_attn.q_proj, layers.0.self_attn.k_proj)" in (
        caplog.text
    )
    assert "fuse gate_up: 2 layers have no sibling left" in caplog.text  # the two gate_proj
    assert "matches no layers" not in caplog.text  # gate_up still groups the w1/w3 MLPs


def test_a_fuse_rule_whose_every_set_is_cut_to_one_layer_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    layers = find_quant_layers(_Model(), exclude=["*.k_proj", "*.v_proj", "*.key", "*.value"])
    with caplog.at_level("WARNING"):
        assert fuse_layers(layers, ["qkv"]) == layers  # nothing grouped
    assert "fuse qkv: 4 layers have no sibling left" in caplog.text  # q_proj, query in 2 blocks
    assert "matches no layers" not in caplog.text  # it matches 4; exclusions left them alone
    assert "lack a member" not in caplog.text


def test_a_fuse_rule_that_matches_nothing_warns_and_an_unknown_one_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    layers = find_quant_layers(TinyNet())
    with caplog.at_level("WARNING"):
        assert fuse_layers(layers, ["qkv"]) == layers
    assert "fuse rule qkv matches no layers" in caplog.text
    with pytest.raises(InputError, match="unknown fuse rule 'qkvo'; accepted: qkv, gate_up"):
        fuse_layers(layers, ["qkvo"])
    with pytest.raises(InputError, match="listed twice: qkv"):
        fuse_layers(layers, ["qkv", "qkv"])
