"""analyze() end to end on tiny models: every method and task, the cache, e2e by hand."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from bitplan.sensitivity.analyzer import METHODS, analyze
from bitplan.sensitivity.data import CalibData
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import parse_format, parse_formats, tensor_bytes
from bitplan.sensitivity.layers import apply_pins, find_quant_layers, quantized
from bitplan.sensitivity.metrics import collect_reference, measure
from bitplan.sensitivity.models import LoadedModel
from bitplan.sensitivity.progress import Cancelled

FORMATS = parse_formats("int8,int4,int2")


class Digits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(pixel_values)).flatten(1)  # (B, 256)
        return self.fc(h)


class LM(nn.Module):
    def __init__(self, pooled: bool = False) -> None:
        super().__init__()
        self.pooled = pooled
        self.emb = nn.Embedding(24, 12)
        self.mix = nn.Conv1d(12, 12, 3, padding=1)
        self.head = nn.Linear(12, 24, bias=False)
        self.head.weight = self.emb.weight

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.emb(input_ids)
        h = h + torch.tanh(self.mix(h.transpose(1, 2))).transpose(1, 2)  # (B, T, 12)
        return h.mean(dim=1) if self.pooled else self.head(h)


def _setup(task: str, seed: int = 0) -> tuple[LoadedModel, CalibData]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if task == "image-classification":
        module: nn.Module = Digits()
        inputs = {"pixel_values": torch.randn(12, 1, 8, 8, generator=gen)}
    else:
        module = LM(pooled=task == "feature-extraction")
        ids = torch.randint(0, 24, (12, 7), generator=gen)
        mask = torch.ones_like(ids)
        mask[::3, 5:] = 0  # some shorter texts
        inputs = {"input_ids": ids * mask, "attention_mask": mask}
    module.eval()
    model = LoadedModel(
        ref=f"test:{task}",
        sha256=f"model-{task}-{seed}",
        module=module,
        task=task,
        layers=find_quant_layers(module),
        tokenizer=None,
        device=torch.device("cpu"),
    )
    return model, CalibData(inputs=inputs, labels=None, sha256=f"data-{seed}")


class Pooled(nn.Module):
    """A feature extractor like ``BertModel``: its pooler runs but the hidden states, not the
    pooled output, are what the metrics compare; ``unused`` never runs at all."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(24, 12)
        self.mix = nn.Linear(12, 12)
        self.pooler = nn.Linear(12, 12)
        self.unused = nn.Linear(12, 3)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> BaseModelOutputWithPooling:
        h = self.emb(input_ids)
        h = h + torch.tanh(self.mix(h))  # (B, T, 12)
        pooled = torch.tanh(self.pooler(h[:, 0]))  # (B, 12)
        return BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=pooled)


def test_fisher_scores_layers_without_gradient_by_layer_or_weight_and_says_so(caplog) -> None:
    model, calib = _setup("feature-extraction")
    torch.manual_seed(0)
    module = Pooled().eval()
    model = replace(model, module=module, layers=find_quant_layers(module))
    with caplog.at_level(logging.WARNING, logger="bitplan.sensitivity"):
        df = analyze(model, calib, method="fisher", formats=FORMATS, batch_size=5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    by = df.groupby("layer")["method"].agg(set).to_dict()
    assert by == {"emb": {"fisher"}, "mix": {"fisher"}, "pooler": {"layer"}, "unused": {"weight"}}
    for name, method in (("pooler", "layer"), ("unused", "weight")):
        alone = analyze(model, calib, method=method, formats=FORMATS, batch_size=5)
        expected = alone[alone["layer"] == name]["error"].tolist()
        got = df[df["layer"] == name]["error"].tolist()
        assert got == expected and 0 < got[0] < got[1] < got[2]  # int8 < int4 < int2
    # One warning per fallback layer, naming the method that scored it; nothing else (the
    # layer method's own "never ran ... scored 0" would contradict the weight fallback).
    assert len(warnings) == 2, warnings
    pooler, unused = warnings
    assert "no gradient reached pooler" in pooler and "'layer'" in pooler
    assert "no gradient reached unused" in unused and "'weight'" in unused
    assert "never ran" in unused and "scored 0" not in unused


def _count_forwards(module: nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("task", ["image-classification", "text-generation"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_a_complete_ordered_table(method: str, task: str) -> None:
    model, calib = _setup(task)
    df = analyze(model, calib, method=method, formats=FORMATS, batch_size=5)
    assert list(df.columns) == [
        "layer",
        "param",
        "format",
        "error",
        "numel",
        "bytes",
        "tie",
        "method",
    ]
    assert set(df["method"]) == {method}
    assert len(df) == len(model.layers) * len(FORMATS)
    for lay in model.layers:
        rows = df[df["layer"] == lay.name].set_index("format")
        assert list(rows.index) == ["int8", "int4", "int2"]
        assert (
            0 < rows.loc["int8", "error"] < rows.loc["int4", "error"] < rows.loc["int2", "error"]
        ), (lay.name, rows["error"].to_dict())
        assert rows.loc["int4", "bytes"] == tensor_bytes(parse_format("int4"), *lay.shape)
        assert set(rows["tie"]) == {lay.tie or ""}


def test_fisher_on_embeddings_uses_random_projections_and_is_seeded() -> None:
    model, calib = _setup("feature-extraction")
    first = analyze(model, calib, method="fisher", formats=FORMATS)
    assert (first["error"] > 0).all()
    assert (
        first["error"].tolist()
        == analyze(model, calib, method="fisher", formats=FORMATS)["error"].tolist()
    )
    assert (
        first["error"].tolist()
        != analyze(model, calib, method="fisher", formats=FORMATS, seed=1)["error"].tolist()
    )


def test_e2e_equals_the_metric_measured_by_hand() -> None:
    model, calib = _setup("text-generation")
    df = analyze(model, calib, method="e2e", formats=FORMATS, batch_size=4)
    reference = collect_reference(model, calib, batch_size=4)
    mix = next(lay for lay in model.layers if lay.name == "mix")
    with quantized(model.module, mix, "int4"):
        by_hand = measure(model, calib, reference)["error"]
    got = df[(df["layer"] == "mix") & (df["format"] == "int4")]["error"].item()
    assert got == pytest.approx(by_hand, rel=1e-9)


def test_second_analyze_comes_from_cache_without_touching_the_model(tmp_path: Path) -> None:
    model, calib = _setup("image-classification")
    calls = _count_forwards(model.module)
    first = analyze(model, calib, method="layer", formats=FORMATS, cache_dir=tmp_path)
    assert calls and len(list((tmp_path / "sensitivity").glob("*.csv"))) == 1
    calls.clear()
    seen: list[tuple[str, int, int]] = []
    again = analyze(
        model,
        calib,
        method="layer",
        formats=list(reversed(FORMATS)),
        cache_dir=tmp_path,
        progress=lambda *a: seen.append(a),
    )
    assert not calls
    assert seen == [("analyze", 2, 2)]
    assert again.equals(first)
    # Other data, a pin or another method is another table.
    other = CalibData(
        inputs={"pixel_values": calib.inputs["pixel_values"] * 2}, labels=None, sha256="data-other"
    )
    analyze(model, other, method="layer", formats=FORMATS, cache_dir=tmp_path)
    assert calls
    pinned = replace(model, layers=apply_pins(model.layers, {"fc": "int8"}))
    df = analyze(pinned, calib, method="layer", formats=FORMATS, cache_dir=tmp_path)
    assert list(df.loc[df["layer"] == "fc", "format"]) == ["int8"]
    assert len(list((tmp_path / "sensitivity").glob("*.csv"))) == 3


def test_weight_method_cache_ignores_the_data(tmp_path: Path) -> None:
    model, calib = _setup("image-classification")
    first = analyze(model, calib, method="weight", formats=FORMATS, cache_dir=tmp_path)
    model.module.fc.weight.data[0, 0] = 50.0  # would change fc's errors if it were re-measured
    other = CalibData(inputs=calib.inputs, labels=None, sha256="data-other")
    assert analyze(model, other, method="weight", formats=FORMATS, cache_dir=tmp_path).equals(first)


def test_progress_cancel_and_bad_arguments() -> None:
    model, calib = _setup("text-generation")
    seen: list[tuple[str, int, int]] = []
    analyze(
        model,
        calib,
        method="layer",
        formats=FORMATS,
        batch_size=5,
        progress=lambda *a: seen.append(a),
    )
    assert ("collect", 3, 3) in seen and seen[-1] == ("analyze", 3, 3)
    with pytest.raises(Cancelled):
        analyze(model, calib, method="fisher", formats=FORMATS, should_cancel=lambda: True)
    assert all(p.requires_grad and p.grad is None for p in model.module.parameters())
    with pytest.raises(InputError, match="unknown sensitivity method 'hessian'"):
        analyze(model, calib, method="hessian", formats=FORMATS)
    with pytest.raises(InputError, match="batch size"):
        analyze(model, calib, method="layer", formats=FORMATS, batch_size=0)
    with pytest.raises(InputError, match="no formats"):
        analyze(model, calib, method="layer", formats=[])
    with pytest.raises(InputError, match="listed twice"):
        analyze(model, calib, method="layer", formats=["int8", "INT8"])
