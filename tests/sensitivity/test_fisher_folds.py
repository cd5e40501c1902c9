"""fisher's two folds: per-weight Fisher sums (small models) and per-format errors streamed batch
by batch (large ones, no memory the size of the model) give the same table."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from bitplan.sensitivity.format_spec import parse_formats
from bitplan.sensitivity.formats import fake_quantize
from bitplan.sensitivity.layers import find_quant_layers
from bitplan.sensitivity.methods import _fisher_folds, fisher_errors
from bitplan.sensitivity.methods._common import tie_groups
from bitplan.sensitivity.methods._fisher_folds import FisherSums, StreamedErrors, gradient_fold
from bitplan.sensitivity.rounder import Rounder

# per-row, grouped, and a rounding other than rtn (hqq needs no calibration data)
FORMATS = parse_formats("int8,int4-g8,int2-g8-asym+hqq")


class TiedLM(nn.Module):
    """Embedding → MLP → head tied to the embedding, and a layer the output never sees."""

    def __init__(self, vocab: int = 32, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.unused = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        return self.head(h + self.down(torch.relu(self.up(h))))  # (B, T, vocab)


def _model(dtype: torch.dtype) -> TiedLM:
    torch.manual_seed(0)
    return TiedLM().to(dtype).eval()


def _batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 32, (4, 6), generator=gen)} for _ in range(3)]


def _scores(model: TiedLM, max_sum_bytes: int | None) -> dict[str, dict[str, float]]:
    return fisher_errors(
        model,
        find_quant_layers(model),
        FORMATS,
        batches=_batches,
        output_fn=lambda b: model(**b),
        target="categorical",
        max_sum_bytes=max_sum_bytes,
    )


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_streamed_errors_equal_the_per_weight_sums(dtype: torch.dtype, rel: float) -> None:
    model = _model(dtype)
    summed = _scores(model, max_sum_bytes=None)  # a tiny model: the sums
    streamed = _scores(model, max_sum_bytes=0)  # any sum is too big: streamed
    # the unused layer has no score either way; the tied tensor is split over its modules
    assert set(summed) == set(streamed) == {"emb", "up", "down", "head"}
    assert streamed["emb"] == streamed["head"]
    for name, errors in summed.items():
        assert list(errors) == [f.name for f in FORMATS]
        assert streamed[name] == pytest.approx(errors, rel=rel), name
        assert 0 < errors["int8"] < errors["int4-g8"], name
    # bfloat16 sums round a few terms; float32 ones agree to float32's own rounding
    if dtype == torch.bfloat16:
        assert streamed != summed
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(("dtype", "itemsize"), [(torch.float32, 4), (torch.bfloat16, 2)])
def test_the_fold_is_chosen_by_the_size_of_the_sums(
    dtype: torch.dtype, itemsize: int, caplog: pytest.LogCaptureFixture
) -> None:
    model = _model(dtype)
    groups = tie_groups(find_quant_layers(model))
    # emb (tied to head) 32x16, up 32x16, down 16x32, unused 16x16: the tie is summed once
    size = (3 * 512 + 256) * itemsize

    def fold(limit: int | None) -> object:
        return gradient_fold(model, groups, FORMATS, None, max_sum_bytes=limit)

    assert isinstance(fold(size), FisherSums)
    assert isinstance(fold(None), FisherSums)  # the default keeps small models fast
    with caplog.at_level(logging.INFO, logger="bitplan.sensitivity"):
        assert isinstance(fold(size - 1), StreamedErrors)
    assert "folding each batch's gradients" in caplog.text


def test_the_default_limit_is_read_when_called(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(torch.float32)
    groups = tie_groups(find_quant_layers(model))
    monkeypatch.setattr(_fisher_folds, "DEFAULT_MAX_SUM_BYTES", 0)
    assert isinstance(gradient_fold(model, groups, FORMATS, None), StreamedErrors)


def test_streaming_keeps_floats_not_tensors() -> None:
    """What makes it the large-model fold: nothing of a weight's size outlives its gradient."""
    model = _model(torch.float32)
    groups = tie_groups(find_quant_layers(model))
    up, down = groups[1], groups[2]
    fold = StreamedErrors(model, groups, FORMATS, None)
    grad = torch.randn_like(model.up.weight)
    fold.fold(up[0].tensor_key, grad)
    fold.fold(up[0].tensor_key, torch.zeros_like(grad))  # adds nothing
    fold.fold(down[0].tensor_key, torch.zeros_like(model.down.weight))  # reached by nothing
    assert fold.errors.keys() == {up[0].tensor_key}
    assert all(isinstance(v, float) for v in fold.errors[up[0].tensor_key].values())
    assert fold.totals(down) is None
    w = model.up.weight.detach()
    codes = Rounder().quantizer("up.weight")
    expected = {
        f.name: float((grad.square() * (fake_quantize(w, f, codes=codes) - w).square()).sum())
        for f in FORMATS
    }
    assert fold.totals(up) == pytest.approx(expected, rel=1e-5)
