"""Quality metrics: output extraction, KL against bounded references, and measure() per task."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from bitplan.sensitivity.data import CalibData, load_calibration
from bitplan.sensitivity.divergence import TOP_K, compare, compress
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.metrics import (
    collect_reference,
    forward_output,
    measure,
)
from bitplan.sensitivity.models import LoadedModel
from bitplan.sensitivity.progress import Cancelled
from tests.sensitivity._data_fixtures import (
    Encoder,
    Regressor,
    TextClassifier,
    digits_model,
    hf_model,
    loaded,
    perturbed,
    tiny_lm,
    word_tokenizer,
)
from tests.sensitivity._fp32_bounds import EPS, SECOND_ORDER, kl_bound, log_softmax_bound


def _kl64(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) ‖ softmax(logits)) per row, independently in float64."""
    p = torch.softmax(ref_logits.double(), -1)
    terms = p * (p.log() - torch.log_softmax(logits.double(), -1))
    return torch.where(p > 0, terms, 0).sum(-1)  # 0 log 0 = 0 on masked-out classes


def _digits_data(n: int = 24) -> CalibData:
    gen = torch.Generator().manual_seed(0)
    return CalibData(
        inputs={"pixel_values": torch.rand(n, 1, 8, 8, generator=gen)},
        labels=torch.randint(0, 10, (n,), generator=gen),
        sha256="digits",
    )


def _lm_data(tmp_path: Path) -> CalibData:
    lines = ["the quick brown fox", "jumps", "over the lazy dog and keeps running", "x", "ab"]
    (tmp_path / "lm.txt").write_text("\n".join(lines) + "\n")
    return load_calibration(str(tmp_path / "lm.txt"), tiny_lm(), max_length=32)


# --- forward_output -------------------------------------------------------------------------


class _Returns(torch.nn.Module):
    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.make(x)


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x * 2,
        lambda x: (x * 2, x),
        lambda x: CausalLMOutput(logits=x * 2),
        lambda x: {"other": x * 2},
    ],
)
def test_forward_output_unwraps(make) -> None:
    x = torch.randn(3, 4)
    out = forward_output(loaded(_Returns(make), "tensor"), {"x": x})
    assert torch.equal(out, x * 2)


def test_forward_output_mean_pools_hidden_states_over_the_mask() -> None:
    model = loaded(_Returns(lambda x: BaseModelOutput(last_hidden_state=x)), "feature-extraction")
    hidden = torch.arange(12.0).view(2, 3, 2)  # (B, T, D)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pooled = forward_output(model, {"x": hidden, "attention_mask": mask})
    assert pooled.tolist() == [[1.0, 2.0], [8.0, 9.0]]
    assert forward_output(model, {"x": hidden}).tolist() == [[2.0, 3.0], [8.0, 9.0]]


def test_forward_output_rejects_other_outputs() -> None:
    with pytest.raises(InputError, match="returned str"):
        forward_output(loaded(_Returns(lambda x: "text"), "tensor"), {"x": torch.ones(1)})


# --- divergence -----------------------------------------------------------------------------


def test_exact_kl_matches_an_independent_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    ref, other = torch.randn(50, 10, generator=gen), torch.randn(50, 10, generator=gen)
    dist = compress(ref)
    assert dist.index is None  # 10 classes: stored exactly
    stats = compare(dist, other)
    assert ((stats.kl.double() - _kl64(ref, other)).abs() <= kl_bound(ref, other)).all()
    assert torch.equal(stats.top1, other.argmax(-1))
    assert torch.equal(compare(dist, ref).kl, torch.zeros(50))


def test_top_k_kl_is_exact_up_to_the_tail_term() -> None:
    gen = torch.Generator().manual_seed(1)
    ref = 2 * torch.randn(40, 300, generator=gen)
    other = ref + 0.5 * torch.randn(40, 300, generator=gen)
    k = 20
    dist = compress(ref, top_k=k)
    assert dist.logp.shape == (40, k) and dist.index.dtype == torch.int32
    approx = compare(dist, other).kl.double()
    # chain rule: KL = KL on {top-k, tail} + p_tail * KL(p(.|tail) || q(.|tail))
    tail = torch.ones_like(ref, dtype=torch.bool).scatter(1, dist.index.long(), False)
    p_tail = torch.where(tail, torch.softmax(ref.double(), -1), 0).sum(-1)
    inside = _kl64(ref.masked_fill(~tail, -math.inf), other.masked_fill(~tail, -math.inf))
    bound = kl_bound(ref, other, kept=dist.index)
    assert (p_tail * inside > 10 * bound).all()  # the check can tell top-k from the full KL
    assert ((approx - (_kl64(ref, other) - p_tail * inside)).abs() <= bound).all()
    assert torch.equal(compare(dist, ref).kl, torch.zeros(40))


def test_top_k_kl_is_within_six_percent_on_peaked_logits() -> None:
    gen = torch.Generator().manual_seed(2)
    vocab = 512
    zipf = -1.5 * torch.arange(1, vocab + 1).log()  # LM-like: probability ∝ rank^-1.5
    ref = torch.stack([zipf[torch.randperm(vocab, generator=gen)] for _ in range(100)])
    other = ref + 0.3 * torch.randn(ref.shape, generator=gen)
    approx = compare(compress(ref, top_k=TOP_K), other).kl.mean().item()
    exact = compare(compress(ref), other).kl.mean().item()
    assert 0.94 * exact < approx <= exact


# --- measure --------------------------------------------------------------------------------


def _batched_logits(model: LoadedModel, data: CalibData, batch_size: int) -> torch.Tensor:
    """The model's outputs over ``data`` in the batches that measure() runs, concatenated.

    Equal batches give bitwise-equal outputs, so the float64 checks below see exactly the
    logits bitplan compared; a full-batch forward would differ in the last bits on some CPUs.
    """
    with torch.no_grad():
        return torch.cat([forward_output(model, b) for b in data.batches(batch_size)])


def test_classification_metrics() -> None:
    model, data = digits_model(), _digits_data()
    with torch.no_grad():  # a fresh CNN's logits are nearly flat (range ~0.2); x30 spreads
        model.module.fc3.weight.mul_(30)  # them, so noise gives a KL far above the float32
        model.module.fc3.bias.mul_(30)  # bound used below (~0.1 vs ~2e-5)
    reference = collect_reference(model, data, batch_size=5)
    same = measure(model, data, reference)
    assert same["error"] == 0.0 and same["kl"] == 0.0 and same["agreement"] == 1.0
    logits = _batched_logits(model, data, 5)
    expected_acc = (logits.argmax(-1) == data.labels).double().mean().item()
    assert same["accuracy"] == same["accuracy_ref"] == pytest.approx(expected_acc)

    noisy = perturbed(model, scale=0.3)
    got = measure(noisy, data, reference)
    noisy_logits = _batched_logits(noisy, data, 5)
    assert got["error"] > 0
    exact = _kl64(logits, noisy_logits).mean().item()
    # measure() averages per-sample float32 KLs in float64: the mean of the per-row bounds
    bound = kl_bound(logits, noisy_logits).mean().item()
    assert got["kl"] == pytest.approx(exact, abs=bound) and exact > 100 * bound
    agree = (noisy_logits.argmax(-1) == logits.argmax(-1)).double().mean().item()
    assert 0 < agree < 1  # the agreement check below can tell a wrong count
    assert got["agreement"] == pytest.approx(agree)
    assert got["accuracy"] == pytest.approx(
        (noisy_logits.argmax(-1) == data.labels).double().mean().item()
    )


def test_text_classification_without_labels(tmp_path: Path) -> None:
    model = loaded(TextClassifier(), "text-classification", tokenizer=word_tokenizer())
    (tmp_path / "t.txt").write_text("the cat sat\na dog ran far away\non a mat\n")
    data = load_calibration(str(tmp_path / "t.txt"), model)
    got = measure(model, data, collect_reference(model, data))
    assert set(got) == {"error", "kl", "agreement"} and got["error"] == 0.0


def test_lm_metrics_mask_padding(tmp_path: Path) -> None:
    model, data = tiny_lm(), _lm_data(tmp_path)
    reference = collect_reference(model, data, batch_size=2)
    assert reference.dist.index is None  # 256 byte tokens: exact
    same = measure(model, data, reference)
    assert same["error"] == 0.0 and same["agreement"] == 1.0

    noisy = perturbed(model, scale=0.3)
    got = measure(noisy, data, reference)
    ref_rows, new_rows, target_rows = [], [], []
    with torch.no_grad():
        for batch in data.batches(2):  # the batches measure() runs: bitwise-equal logits
            ids, mask = batch["input_ids"], batch["attention_mask"].bool()
            counted = mask[:, :-1] & mask[:, 1:]  # (B, T-1): both tokens real
            ref_rows.append(model.module(**batch)[:, :-1][counted])  # (M, V)
            new_rows.append(noisy.module(**batch)[:, :-1][counted])
            target_rows.append(ids[:, 1:][counted])  # (M,)
    ref_logits, new_logits = torch.cat(ref_rows), torch.cat(new_rows)
    targets = torch.cat(target_rows)
    assert len(targets) == len(reference.dist) > len(data.inputs["input_ids"])
    nll_ref = F.cross_entropy(ref_logits.double(), targets).item()
    nll = F.cross_entropy(new_logits.double(), targets).item()
    # −log q(target) is one float32 log-softmax entry; exp(mean nll + δ) = ppl·(1 + δ + O(δ²))
    for key, value, logits in (
        ("perplexity_ref", nll_ref, ref_logits),
        ("perplexity", nll, new_logits),
    ):
        rel = SECOND_ORDER * log_softmax_bound(logits).mean().item()
        assert got[key] == pytest.approx(math.exp(value), rel=rel)
    exact = _kl64(ref_logits, new_logits).mean().item()
    bound = kl_bound(ref_logits, new_logits).mean().item()
    assert got["kl"] == pytest.approx(exact, abs=bound) and exact > 10 * bound
    assert got["error"] == got["kl"] > 0


def test_lm_top_k_reference_is_bounded_and_close(tmp_path: Path) -> None:
    model, data = tiny_lm(vocab=2048), _lm_data(tmp_path)
    reference = collect_reference(model, data)
    positions = len(reference.dist)
    assert reference.dist.logp.shape == (positions, TOP_K)  # 2048 > EXACT_VOCAB: top-k
    assert reference.nbytes == positions * (TOP_K * (4 + 4) + 4 + 8)
    assert measure(model, data, reference)["error"] == 0.0
    noisy = perturbed(model, scale=0.3)
    exact = collect_reference(model, data, top_k=2048)
    approx_kl, exact_kl = (measure(noisy, data, r)["kl"] for r in (reference, exact))
    assert 0 < approx_kl <= exact_kl


def test_embedding_metrics() -> None:
    torch.manual_seed(0)
    model = loaded(Encoder(), "feature-extraction")
    data = CalibData(
        inputs={
            "input_ids": torch.randint(0, 256, (6, 5)),
            "attention_mask": torch.tensor([[1] * 5, [1, 1, 0, 0, 0]] * 3),
        },
        labels=None,
        sha256="e",
    )
    reference = collect_reference(model, data, batch_size=4)
    assert measure(model, data, reference) == {"error": 0.0, "cosine": 1.0}
    flipped = perturbed(model, scale=0.0)
    with torch.no_grad():
        flipped.module.proj.weight.neg_()
        flipped.module.proj.bias.neg_()
    got = measure(flipped, data, reference)
    assert got["cosine"] == pytest.approx(-1.0) and got["error"] == pytest.approx(2.0)
    with torch.no_grad():
        flipped.module.proj.weight.mul_(-3.0)  # same direction as the reference, 3x longer
        flipped.module.proj.bias.mul_(-3.0)
    assert measure(flipped, data, reference)["error"] < 1e-12
    with torch.no_grad():
        flipped.module.proj.weight.zero_()
        flipped.module.proj.bias.zero_()
    assert measure(flipped, data, reference) == {"error": 1.0, "cosine": 0.0}


def test_tensor_metrics_rel_mse_and_sqnr() -> None:
    torch.manual_seed(0)
    model = loaded(Regressor(), "tensor")
    data = CalibData(inputs={"x": torch.randn(10, 4)}, labels=None, sha256="r")
    reference = collect_reference(model, data, batch_size=3)
    same = measure(model, data, reference)
    assert same["error"] == same["rel_mse"] == 0.0 and same["sqnr_db"] == 300.0
    scaled = perturbed(model, scale=0.0)
    with torch.no_grad():
        for p in scaled.module.parameters():
            p.mul_(1.01)  # output = 1.01 x reference: noise/signal = 0.01^2
    got = measure(scaled, data, reference)
    # Each output is a float32 dot product of K = 4 terms plus a bias, in both models, and the
    # scaled weights are rounded once: |y' − 1.01·y| ≤ 1.01·(K + 2)·EPS·(|W|·|x| + |b|) =: c
    # per element (first order). By the triangle inequality √rel_mse = ‖y' − y‖ / ‖y‖ is
    # within ‖c‖ / ‖y‖ of 0.01.
    fc = model.module.fc
    x = data.inputs["x"].double()
    y = x @ fc.weight.double().T + fc.bias.double()  # (10, 6)
    c = 1.01 * 6 * EPS * (x.abs() @ fc.weight.double().abs().T + fc.bias.double().abs())
    slack = SECOND_ORDER * (c.norm() / y.norm()).item()
    assert math.sqrt(got["rel_mse"]) == pytest.approx(0.01, abs=slack) and slack < 1e-4
    assert got["error"] == got["rel_mse"]
    assert got["sqnr_db"] == pytest.approx(-10 * math.log10(got["rel_mse"]))


def test_measure_rejects_other_data_and_bad_labels(tmp_path: Path) -> None:
    model, data = digits_model(), _digits_data()
    reference = collect_reference(model, data)
    with pytest.raises(ValueError, match="other data"):
        measure(model, _digits_data(10), reference)
    bad = CalibData(inputs=data.inputs, labels=data.labels + 10, sha256="bad")
    with pytest.raises(InputError, match="out of range.*10 classes"):
        collect_reference(model, bad)
    (tmp_path / "one.txt").write_text("a\nb\n")
    lm = tiny_lm()
    with pytest.raises(InputError, match="at least 2 tokens"):
        collect_reference(lm, load_calibration(str(tmp_path / "one.txt"), lm))


@pytest.mark.parametrize(
    "task, error_key",
    [
        ("text-classification", "kl"),
        ("feature-extraction", "cosine"),
        ("text-generation", "kl"),
    ],
)
def test_hugging_face_models_end_to_end(tmp_path: Path, task: str, error_key: str) -> None:
    model = hf_model(task)
    lines = [
        {"text": "the cat sat on a mat", "label": 0},
        {"text": "a dog ran", "label": 2},
        {"text": "far away", "label": 1},
        {"text": "the dog sat", "label": 1},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    data = load_calibration(str(tmp_path / "d.jsonl"), model, max_length=5)
    # the tokenizer emits token_type_ids; only models whose forward() takes them get them
    accepted = set(inspect.signature(model.module.forward).parameters)
    assert set(data.inputs) == {"input_ids", "attention_mask", "token_type_ids"} & accepted
    assert (data.labels is not None) == (task == "text-classification")
    reference = collect_reference(model, data, batch_size=3)
    same = measure(model, data, reference)
    assert same["error"] == 0.0 and error_key in same
    assert measure(perturbed(model, scale=0.3), data, reference)["error"] > 0


def test_collect_reference_reports_progress_and_cancels() -> None:
    model, data = digits_model(), _digits_data(10)
    calls: list[tuple[str, int, int]] = []
    collect_reference(model, data, batch_size=4, progress=lambda *a: calls.append(a))
    assert calls == [("reference", 4, 10), ("reference", 8, 10), ("reference", 10, 10)]
    with pytest.raises(Cancelled):
        collect_reference(model, data, should_cancel=lambda: True)
