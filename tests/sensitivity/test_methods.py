"""Sensitivity methods on tiny hand-built modules: exactness against explicit computations,
ordering by bit width, tie groups, pins, progress and cancellation."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import pytest
import torch
from torch import nn

from bitplan.sensitivity.formats import (
    QuantCodes,
    QuantFormat,
    fake_quantize,
    parse_format,
    parse_formats,
    quantize_codes,
)
from bitplan.sensitivity.layers import QuantLayer, apply_pins, find_quant_layers, quantized
from bitplan.sensitivity.methods import (
    e2e_errors,
    fisher_errors,
    layer_errors,
    weight_errors,
)
from bitplan.sensitivity.methods._common import (
    ELEMENTWISE_CHUNK_ELEMENTS,
    MATMUL_CHUNK_ELEMENTS,
    iter_deltas,
)
from bitplan.sensitivity.progress import Cancelled

METHODS = ("weight", "layer", "fisher", "e2e")
FORMATS = parse_formats("int8,int4,int2")  # per-row formats: error must rise as bits fall


class TinyLM(nn.Module):
    """Embedding → MLP → head tied to the embedding; per-token, so padding cannot leak."""

    def __init__(self, vocab: int = 32, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.emb(input_ids)
        return self.head(h + self.down(torch.relu(self.up(h))))  # (B, T, vocab)


def _lm_batches(n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 32, (4, 6), generator=gen)} for _ in range(n)]


def _model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM().eval()


def _rising(scores: dict[str, dict[str, float]]) -> None:
    for name, errs in scores.items():
        assert 0 < errs["int8"] < errs["int4"] < errs["int2"], (name, errs)


def _explicit_output_error(module: nn.Module, x: torch.Tensor, fmt_name: str) -> float:
    """``‖ΔW·X‖² / ‖W·X‖²`` by running the layer (bias removed) with W and with Q(W)."""
    module = copy.deepcopy(module)
    if getattr(module, "bias", None) is not None:
        module.bias.data.zero_()
    seq = nn.Sequential(module)
    (lay,) = find_quant_layers(seq)
    with torch.no_grad():
        y = seq(x).double()
        with quantized(seq, lay, fmt_name):
            yq = seq(x).double()
    return float((yq - y).square().sum() / y.square().sum())


# ---- weight -------------------------------------------------------------------------------


def test_weight_matches_definition_and_rises_as_bits_fall() -> None:
    model = _model()
    layers = find_quant_layers(model)
    scores = weight_errors(model, layers, FORMATS)
    _rising(scores)
    w = model.up.weight.detach()
    q = fake_quantize(w, parse_format("int4"))
    expected = float((q - w).square().sum() / w.square().sum())
    assert scores["up"]["int4"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("chunk", [MATMUL_CHUNK_ELEMENTS, ELEMENTWISE_CHUNK_ELEMENTS, 300, 1])
def test_deltas_of_any_chunk_size_are_the_whole_matrix_deltas(chunk: int) -> None:
    """Chunks are whole rows (at least one), they cover every row once, and a grouped format
    quantizes a chunk of rows exactly as those rows of the whole matrix."""
    w = torch.randn(37, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    fmt = parse_format("int4-g128")
    parts = list(iter_deltas(w, fmt, chunk_elements=chunk))
    rows = [stop - start for start, stop, _, _ in parts]
    assert all(r == min(max(1, chunk // 256), 37) for r in rows[:-1]) and sum(rows) == 37
    expected = fake_quantize(w, fmt).to(torch.float32) - w.to(torch.float32)
    assert torch.equal(torch.cat([dw for _, _, _, dw in parts]), expected)


def test_a_rounded_format_is_rounded_in_few_tall_chunks() -> None:
    """gptq's work per call (factoring the inverse Hessian) does not shrink with the chunk, so a
    format with a rounding other than rtn is never cut into the small element-wise chunks."""
    calls: list[int] = []

    def codes(chunk: torch.Tensor, fmt: QuantFormat, row0: int) -> QuantCodes:
        calls.append(row0)
        return quantize_codes(chunk, fmt.with_rounding("rtn"))

    w = torch.randn(1000, 256)
    gptq, rtn = parse_format("int4-g128+gptq"), parse_format("int4-g128")
    list(iter_deltas(w, gptq, codes=codes, chunk_elements=ELEMENTWISE_CHUNK_ELEMENTS // 64))
    fake_quantize(w, gptq, codes=codes)
    assert calls == [0, 0]  # one call each for 256 000 weights
    calls.clear()
    list(iter_deltas(w, rtn, codes=codes, chunk_elements=256 * 100))
    assert calls == list(range(0, 1000, 100))  # rtn: the chunk asked for


def test_tensor_level_methods_split_tied_tensor_over_its_modules() -> None:
    model = _model()
    layers = find_quant_layers(model)
    scores = weight_errors(model, layers, FORMATS)
    assert scores["emb"] == scores["head"]
    w = model.emb.weight.detach()
    q = fake_quantize(w, parse_format("int8"))
    whole = float((q - w).square().sum() / w.square().sum())
    assert scores["emb"]["int8"] + scores["head"]["int8"] == pytest.approx(whole, rel=1e-5)


def _mse_evaluator(model: nn.Module) -> Callable[[], float]:
    """Mean squared change of the logits against the full-precision model, over fixed data."""
    batches = _lm_batches()
    with torch.no_grad():
        ref = [model(**b) for b in batches]

    def evaluate() -> float:
        with torch.no_grad():
            pairs = zip(batches, ref, strict=True)
            return float(sum((model(**b) - r).square().mean() for b, r in pairs))

    return evaluate


def _run(method: str, model: TinyLM, layers: list[QuantLayer]) -> dict[str, dict[str, float]]:
    if method == "weight":
        return weight_errors(model, layers, FORMATS)
    if method == "layer":
        return layer_errors(model, layers, FORMATS, batches=_lm_batches)
    if method == "fisher":
        return fisher_errors(
            model,
            layers,
            FORMATS,
            batches=_lm_batches,
            output_fn=lambda b: model(**b),
            target="categorical",
        )
    return e2e_errors(model, layers, FORMATS, evaluate=_mse_evaluator(model))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_rises_as_bits_fall_and_honours_pins(method: str) -> None:
    model = _model()
    layers = find_quant_layers(model)
    _rising(_run(method, model, layers))
    pinned = apply_pins(layers, {"up": "int6-g8", "head": "int8"})
    scores = _run(method, model, pinned)
    assert set(scores) == {lay.name for lay in layers}
    assert list(scores["up"]) == ["int6-g8"]  # pinned to a format outside the list
    assert list(scores["emb"]) == list(scores["head"]) == ["int8"]  # the whole tie group
    assert list(scores["down"]) == ["int8", "int4", "int2"]
    assert all(err >= 0 for errs in scores.values() for err in errs.values())


# ---- layer --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, shape",
    [
        (nn.Linear(12, 7), (5, 3, 12)),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, dilation=1), (2, 4, 9, 9)),
        (nn.Conv2d(3, 5, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1)), (2, 3, 8, 7)),
        (nn.Conv2d(2, 4, 2, padding="same", padding_mode="reflect"), (2, 2, 6, 6)),
        (nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), (3, 4, 11)),
    ],
)
def test_layer_gram_equals_explicit_output_error(module: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape)
    seq = nn.Sequential(module)
    layers = find_quant_layers(seq)
    scores = layer_errors(
        seq, layers, FORMATS, batches=lambda: [{"input": x}], forward=lambda b: seq(b["input"])
    )
    for fmt in ("int8", "int4", "int2"):
        assert scores["0"][fmt] == pytest.approx(_explicit_output_error(module, x, fmt), rel=1e-4)


def test_layer_embedding_uses_token_counts() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 6)
    ids = torch.tensor([[1, 1, 1, 2], [3, 3, 9, 1]])
    seq = nn.Sequential(emb)
    scores = layer_errors(
        seq,
        find_quant_layers(seq),
        FORMATS,
        batches=lambda: [{"input": ids}],
        forward=lambda b: seq(b["input"]),
    )
    assert scores["0"]["int4"] == pytest.approx(_explicit_output_error(emb, ids, "int4"), rel=1e-5)


def test_layer_hf_conv1d_is_seen_as_out_by_in() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(7, 5)  # nf=7 outputs, nx=5 inputs; weight stored (5, 7)
    x = torch.randn(3, 4, 5)
    seq = nn.Sequential(conv)
    (lay,) = find_quant_layers(seq)
    assert lay.kind == "hf_conv1d" and lay.shape == (7, 5)
    scores = layer_errors(
        seq, [lay], FORMATS, batches=lambda: [{"input": x}], forward=lambda b: seq(b["input"])
    )
    assert scores["0"]["int2"] == pytest.approx(_explicit_output_error(conv, x, "int2"), rel=1e-4)


def test_layer_skips_padded_tokens() -> None:
    model = _model()
    layers = find_quant_layers(model)
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    padded = ids.clone()
    padded[0, 3:] = 0  # pad token; must not count
    masked = layer_errors(
        model, layers, FORMATS, batches=lambda: [{"input_ids": padded, "attention_mask": mask}]
    )
    # The same tokens without padding: the short row alone, then the full row.
    plain = layer_errors(
        model, layers, FORMATS, batches=lambda: [{"input_ids": ids[:1, :3]}, {"input_ids": ids[1:]}]
    )
    for name in plain:
        for fmt in plain[name]:
            assert masked[name][fmt] == pytest.approx(plain[name][fmt], rel=1e-5)


def test_layer_one_forward_pass_or_several_under_a_memory_cap() -> None:
    model = _model()
    layers = find_quant_layers(model)
    batches = _lm_batches()
    calls = []

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        calls.append(1)
        return model(**batch)

    one = layer_errors(model, layers, FORMATS, batches=lambda: batches, forward=forward)
    assert len(calls) == len(batches)  # one pass serves every layer and format
    _rising(one)
    calls.clear()
    capped = layer_errors(
        model, layers, FORMATS, batches=lambda: batches, forward=forward, max_stats_bytes=1
    )
    assert len(calls) == len(batches) * len(layers)  # one pass per layer
    for name in one:
        assert capped[name] == pytest.approx(one[name])
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed


class _WithIdle(nn.Module):
    """``used`` runs on the data; ``idle`` never runs; ``zeros`` sees only zero inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(6, 6)
        self.idle = nn.Linear(6, 6)
        self.zeros = nn.Linear(6, 6)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.used(input) + self.zeros(torch.zeros_like(input))


@pytest.mark.parametrize("skip", [False, True])
def test_layer_without_signal_is_scored_0_with_a_warning_or_left_out(
    skip: bool, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    model = _WithIdle()
    x = torch.randn(4, 6)
    progress: list[tuple[str, int, int]] = []
    with caplog.at_level(logging.INFO, logger="bitplan.sensitivity.methods.layer"):
        scores = layer_errors(
            model,
            find_quant_layers(model),
            FORMATS,
            batches=lambda: [{"input": x}],
            skip_unmeasured=skip,
            progress=lambda *a: progress.append(a),
        )
    _rising({"used": scores["used"]})
    assert [s for s in progress if s[0] == "analyze"][-1] == ("analyze", 3, 3)
    said = {r.getMessage().split()[1]: r for r in caplog.records}
    assert "never ran" in said["idle"].getMessage()
    assert "only zero inputs" in said["zeros"].getMessage()
    if skip:  # the caller scores them and says how; here only an info line
        assert set(scores) == {"used"}
        assert {r.levelno for r in said.values()} == {logging.INFO}
    else:
        assert scores["idle"] == scores["zeros"] == dict.fromkeys(["int8", "int4", "int2"], 0.0)
        assert {r.levelno for r in said.values()} == {logging.WARNING}


def test_progress_and_cancel() -> None:
    model = _model()
    layers = find_quant_layers(model)
    seen: list[tuple[str, int, int]] = []
    layer_errors(
        model, layers, FORMATS, batches=_lm_batches, n_batches=3, progress=lambda *a: seen.append(a)
    )
    assert [s for s in seen if s[0] == "collect"][-1] == ("collect", 3, 3)
    assert [s for s in seen if s[0] == "analyze"] == [("analyze", i, 4) for i in range(1, 5)]
    with pytest.raises(Cancelled):
        weight_errors(model, layers, FORMATS, should_cancel=lambda: True)
    assert not any(m._forward_pre_hooks for m in model.modules())
    with pytest.raises(Cancelled):
        layer_errors(model, layers, FORMATS, batches=_lm_batches, should_cancel=lambda: True)
    assert not any(m._forward_pre_hooks for m in model.modules())


# ---- fisher -------------------------------------------------------------------------------


def test_fisher_is_nonzero_rises_with_fewer_bits_and_is_seeded() -> None:
    model = _model()
    layers = find_quant_layers(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def run(seed: int) -> dict[str, dict[str, float]]:
        return fisher_errors(
            model,
            layers,
            FORMATS,
            batches=_lm_batches,
            output_fn=lambda b: model(**b),
            target="categorical",
            seed=seed,
        )

    first = run(0)
    _rising(first)
    assert first == run(0)
    assert first != run(1)
    assert first["emb"] == first["head"]  # one tensor, one Fisher, split over its modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_fisher_equals_the_hand_computed_true_fisher_of_a_linear_classifier() -> None:
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(6, 4, bias=False))
    xs = [torch.randn(5, 6) for _ in range(2)]
    scores = fisher_errors(
        seq,
        find_quant_layers(seq),
        FORMATS,
        batches=lambda: [{"input": x} for x in xs],
        output_fn=lambda b: seq(b["input"]),
        target="categorical",
        seed=3,
    )
    w = seq[0].weight.detach()
    gen = torch.Generator().manual_seed(3)
    fisher = torch.zeros_like(w)
    with torch.no_grad():
        for x in xs:
            p = seq(x).softmax(dim=-1)  # (5, 4)
            y = torch.multinomial(p, 1, generator=gen).squeeze(1)  # labels from the model
            # d(Σ cross-entropy)/dW for a linear layer: (softmax − onehot)ᵀ · X
            g = (p - nn.functional.one_hot(y, 4)).T @ x  # (4, 6)
            fisher += g.square()
    fisher /= 10  # two batches of five predictions
    for fmt in FORMATS:
        dw = fake_quantize(w, fmt) - w
        assert scores["0"][fmt.name] == pytest.approx(
            0.5 * float((fisher * dw.square()).sum()), rel=1e-4
        )


def test_fisher_leaves_out_layers_no_gradient_reaches() -> None:
    torch.manual_seed(0)
    used, unused = nn.Linear(8, 4), nn.Linear(8, 4)
    model = nn.ModuleDict({"used": used, "unused": unused})
    xs = [{"input": torch.randn(5, 8)} for _ in range(2)]
    scores = fisher_errors(
        model,
        find_quant_layers(model),
        FORMATS,
        batches=lambda: xs,
        output_fn=lambda b: used(b["input"]),
        target="categorical",
    )
    assert set(scores) == {"used"}  # no score, rather than a Fisher of 0 that calls it free
    _rising(scores)


def test_fisher_projection_for_tensor_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).eval()
    xs = [{"input": torch.randn(5, 8)} for _ in range(2)]
    scores = fisher_errors(
        model,
        find_quant_layers(model),
        FORMATS,
        batches=lambda: xs,
        output_fn=lambda b: model(b["input"]),
        target="projection",
    )
    _rising(scores)


def test_fisher_rejects_outputs_without_gradients() -> None:
    model = _model()

    def no_grad_output(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return model(**batch)

    with pytest.raises(RuntimeError, match="autograd"):
        fisher_errors(
            model,
            find_quant_layers(model),
            FORMATS,
            batches=_lm_batches,
            output_fn=no_grad_output,
            target="categorical",
        )
    assert all(p.requires_grad for p in model.parameters())


# ---- e2e ----------------------------------------------------------------------------------


def test_e2e_equals_measuring_by_hand_and_restores_weights() -> None:
    model = _model()
    layers = find_quant_layers(model)
    evaluate = _mse_evaluator(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scores = e2e_errors(model, layers, FORMATS, evaluate=evaluate)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])
    down = next(lay for lay in layers if lay.name == "down")
    with quantized(model, down, "int4"):
        by_hand = evaluate()
    assert scores["down"]["int4"] == pytest.approx(by_hand, rel=1e-6)
    with quantized(model, layers[0], "int2"):  # the tied tensor: embedding and head at once
        whole = evaluate()
    assert scores["emb"]["int2"] + scores["head"]["int2"] == pytest.approx(whole, rel=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_model_stays_bf16_and_agrees_with_fp32(method: str) -> None:
    model = _model()
    layers = find_quant_layers(model)
    full = _run(method, model, layers)
    half = model.to(torch.bfloat16)
    scores = _run(method, half, layers)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    for name in full:  # bf16 rounding of weights and activations moves scores a little
        assert scores[name]["int2"] == pytest.approx(full[name]["int2"], rel=0.1)
