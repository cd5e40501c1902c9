"""PlanApplier: whole plans applied in place from an on-disk snapshot, then restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitplan.search.applier import PlanApplier
from bitplan.sensitivity.formats import QuantFormat, fake_quantize, parse_format
from bitplan.sensitivity.fusion import fuse_layers
from bitplan.sensitivity.layers import find_quant_layers


def _parsed(choice: dict[str, str]) -> dict[str, QuantFormat]:
    return {group: parse_format(name) for group, name in choice.items()}


def _model() -> nn.Module:
    torch.manual_seed(0)
    emb = nn.Embedding(30, 16)
    head = nn.Linear(16, 30, bias=False)
    head.weight = emb.weight
    return nn.Sequential(emb, nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), head).bfloat16()


def test_apply_switches_formats_and_restores() -> None:
    model = _model()
    layers = find_quant_layers(model)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = {lay.group for lay in layers}
    assert groups == {"0.weight", "1", "3"}
    with PlanApplier(model, layers) as applier:
        applier.apply(_parsed({"0.weight": "int4-g8", "1": "int2-g4-asym"}))
        expect = fake_quantize(originals["0.weight"], parse_format("int4-g8"))
        assert torch.equal(model[0].weight, expect) and model[4].weight is model[0].weight
        assert torch.equal(
            model[1].weight, fake_quantize(originals["1.weight"], parse_format("int2-g4-asym"))
        )
        assert torch.equal(model[3].weight, originals["3.weight"])  # absent: full precision
        applier.apply(_parsed({"0.weight": "int8", "1": "int2-g4-asym", "3": "fp8-e4m3"}))
        assert torch.equal(
            model[0].weight, fake_quantize(originals["0.weight"], parse_format("int8"))
        )
        assert model[0].weight.dtype == torch.bfloat16
    for name, p in model.named_parameters():
        assert torch.equal(p, originals[name]), name


def test_restores_on_error_and_refuses_use_outside_block() -> None:
    model = _model()
    layers = find_quant_layers(model)
    before = model[1].weight.detach().clone()
    applier = PlanApplier(model, layers)
    with pytest.raises(RuntimeError, match="outside"):
        applier.apply(_parsed({"1": "int8"}))
    with pytest.raises(KeyError), applier:
        applier.apply(_parsed({"1": "int2"}))
        assert not torch.equal(model[1].weight, before)  # the restore below has work to do
        raise KeyError("trial failed")
    assert torch.equal(model[1].weight, before)


_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def _blocks() -> nn.Module:
    """Two attention blocks (q/k/v/o, k and v narrower as with grouped queries) and an MLP."""
    torch.manual_seed(0)

    def block() -> nn.Module:
        attn = {n: nn.Linear(16, 8 if n in ("k_proj", "v_proj") else 16) for n in _QKVO}
        return nn.ModuleDict({"attn": nn.ModuleDict(attn), "mlp": nn.Linear(16, 16)})

    return nn.ModuleDict({"blocks": nn.ModuleList([block(), block()])})


def test_a_share_group_choice_quantizes_exactly_its_members() -> None:
    model = _blocks()
    layers = fuse_layers(find_quant_layers(model), ["qkv"])
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    int4 = parse_format("int4-g8")
    fused = {f"blocks.1.attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj")}
    with PlanApplier(model, layers) as applier:
        applier.apply({"blocks.1.attn.qkv": int4})
        for name, p in model.named_parameters():
            if name in fused:  # q, k and v of block 1, each its own tensor in int4
                assert torch.equal(p, fake_quantize(originals[name], int4)), name
                assert not torch.equal(p, originals[name]), name
            else:  # block 0's q/k/v, every o_proj and MLP, and the biases: untouched
                assert torch.equal(p, originals[name]), name
    for name, p in model.named_parameters():
        assert torch.equal(p, originals[name]), name
