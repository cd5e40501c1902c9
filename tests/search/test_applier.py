"""PlanApplier: whole plans applied in place from an on-disk snapshot, then restored."""

from __future__ import annotations

from pathlib import Path

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


def _mapped_files() -> str:
    """The file mappings of this process (Linux), where a memory-mapped snapshot would show."""
    return Path("/proc/self/maps").read_text(encoding="utf-8")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_the_snapshot_is_read_not_mapped_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """Pages of a mapped file count as resident memory; plain reads do not keep any."""
    model = _model()
    layers = find_quant_layers(model)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    with PlanApplier(model, layers, workdir=tmp_path) as applier:
        applier.apply(_parsed({"0.weight": "int4-g8", "1": "int8", "3": "int2-g4-asym"}))
        applier.apply(_parsed({"1": "int4-g8"}))  # 0.weight and 3 read back in place
        (snapshot,) = tmp_path.iterdir()
        assert str(snapshot) not in _mapped_files()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError), PlanApplier(model, layers, workdir=tmp_path) as applier:
        applier.apply(_parsed({"1": "int2"}))
        raise ValueError("trial failed")
    assert list(tmp_path.iterdir()) == []
    for name, p in model.named_parameters():
        assert torch.equal(p, originals[name]), name


def test_weights_that_are_not_contiguous_are_restored_bit_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)).bfloat16()
    transposed = torch.randn(8, 16, dtype=torch.bfloat16).t()  # (16, 8), column-major
    model[0].weight = nn.Parameter(transposed)
    assert not model[0].weight.is_contiguous()
    layers = find_quant_layers(model)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    int4 = parse_format("int4-g8")
    with PlanApplier(model, layers, workdir=tmp_path) as applier:
        applier.apply({"0": int4, "1": int4})
        assert torch.equal(model[0].weight, fake_quantize(originals["0.weight"], int4))
        applier.apply({"1": int4})
        assert torch.equal(model[0].weight, originals["0.weight"])
        assert not model[0].weight.is_contiguous()  # written into, not replaced
    for name, p in model.named_parameters():
        assert torch.equal(p, originals[name]), name
