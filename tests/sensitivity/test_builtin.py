"""Builtin models: held-out quality, determinism, caching, the byte tokenizer and calibration."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch

from bitplan.sensitivity import builtin
from bitplan.sensitivity.builtin import (
    builtin_calibration,
    lm_loss,
    train_digits_cnn,
    train_tiny_lm,
)
from bitplan.sensitivity.builtin_nets import ByteTokenizer, TinyLM
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.models import load_model


def test_digits_cnn_is_accurate_on_held_out_digits(digits_model):
    inputs, labels = builtin_calibration(digits_model.builtin_data)
    with torch.no_grad():
        predicted = digits_model.module(**inputs).argmax(dim=1)
    assert inputs["pixel_values"].shape[1:] == (1, 8, 8) and 0 <= inputs["pixel_values"].min()
    assert inputs["pixel_values"].max() <= 1
    assert (predicted == labels).float().mean() > 0.9


def test_held_out_digits_are_disjoint_from_training():
    train_x, _, held_x, _ = builtin.digits_split()
    assert len(train_x) + len(held_x) == 1797  # all of sklearn's digits, split once
    train_rows = {tuple(row.tolist()) for row in train_x.flatten(1)}
    fresh = sum(tuple(row.tolist()) not in train_rows for row in held_x.flatten(1))
    assert fresh > 0.95 * len(held_x)  # sklearn's digits hold a few exact duplicate images


def test_same_seed_same_weights_other_seed_other_weights():
    first, second = train_digits_cnn(seed=3, epochs=1), train_digits_cnn(seed=3, epochs=1)
    other = train_digits_cnn(seed=4, epochs=0)  # initial weights already depend on the seed
    for (name, a), b, c in zip(
        first.state_dict().items(),
        second.state_dict().values(),
        other.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name
        assert not torch.equal(a, c), name
    calls: list[tuple[int, int]] = []
    lm_a = train_tiny_lm(seed=1, steps=2, on_step=lambda *a: calls.append(a))
    lm_b = train_tiny_lm(seed=1, steps=2)
    assert calls == [(1, 2), (2, 2)]
    assert all(
        torch.equal(a, b)
        for a, b in zip(lm_a.state_dict().values(), lm_b.state_dict().values(), strict=True)
    )


def test_training_leaves_global_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    train_tiny_lm(seed=0, steps=1)
    assert torch.equal(torch.rand(3), expected)


def _with_training(monkeypatch, train) -> None:
    recipe = builtin._RECIPES["digits-cnn"]
    monkeypatch.setitem(builtin._RECIPES, "digits-cnn", dataclasses.replace(recipe, train=train))


def test_second_load_reads_the_cache(tmp_path, monkeypatch, caplog):
    _with_training(
        monkeypatch, lambda seed, on_step: train_digits_cnn(seed=seed, epochs=2, on_step=on_step)
    )
    seen: list[tuple[str, int, int]] = []
    with caplog.at_level(logging.INFO, logger="bitplan.sensitivity.builtin"):
        first = load_model(
            "builtin:digits-cnn",
            device="cpu",
            cache_dir=tmp_path,
            progress=lambda *a: seen.append(a),
        )
    files = sorted(p.name for p in (tmp_path / "builtin").iterdir())
    assert files == ["digits-cnn-v1-seed0.safetensors"]  # no temp files left behind
    # the first use says that it trains, and that only the first use does, epoch by epoch
    stage = "training builtin:digits-cnn (first use, cached afterwards)"
    assert seen == [(stage, 1, 2), (stage, 2, 2)]
    assert any(stage in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)

    def no_training(seed: int, on_step):
        raise AssertionError("trained again despite the cache")

    _with_training(monkeypatch, no_training)
    seen.clear()
    second = load_model(
        "builtin:digits-cnn", device="cpu", cache_dir=tmp_path, progress=lambda *a: seen.append(a)
    )
    assert seen == []
    assert second.sha256 == first.sha256
    for a, b in zip(first.module.parameters(), second.module.parameters(), strict=True):
        assert torch.equal(a, b)


def test_tiny_lm_beats_uniform_on_held_out_text(tiny_lm_model):
    inputs, labels = builtin_calibration("text")
    assert labels is None and inputs["input_ids"].shape[1] == 64
    assert inputs["input_ids"].dtype == torch.long and len(inputs["input_ids"]) <= 256
    with torch.no_grad():
        loss = lm_loss(tiny_lm_model.module, inputs["input_ids"])
    assert loss < math.log(256) - 1.5  # uniform over bytes is log 256 ≈ 5.55 nats


def test_tiny_lm_layers_and_tie_group(tiny_lm_model):
    layers = tiny_lm_model.layers
    assert tiny_lm_model.task == "text-generation" and tiny_lm_model.builtin_data == "text"
    assert len({lay.group for lay in layers}) >= 20
    tied = [lay for lay in layers if lay.tie is not None]
    assert {lay.name for lay in tied} == {"wte", "lm_head"} and len({t.tie for t in tied}) == 1
    assert {lay.kind for lay in layers} == {"embedding", "linear"}


def test_tiny_lm_padding_does_not_change_valid_logits():
    # Any weights show the property, so a fresh float64 model (no training, no cache): float64
    # rounding over 4 blocks of dot products of <= 256 terms moves logits by < 1e-12 of their
    # scale, while a padded key that leaked into attention would move them by O(1/T) of it.
    torch.manual_seed(0)
    module = TinyLM().double().eval()
    tok = ByteTokenizer()
    batch = tok(
        ["a short line", "a somewhat longer line of text"], padding=True, return_tensors="pt"
    )
    alone = tok(["a short line"], return_tensors="pt")
    with torch.no_grad():
        padded = module(**batch)  # (2, T, 256)
        single = module(input_ids=alone["input_ids"], attention_mask=None)
    n = alone["input_ids"].shape[1]
    assert padded.shape == (2, batch["input_ids"].shape[1], 256) and n < padded.shape[1]
    scale = single.abs().max().item()
    torch.testing.assert_close(padded[0, :n], single[0], rtol=0, atol=1e-9 * scale)
    assert torch.isfinite(padded).all()


def test_byte_tokenizer_round_trip_padding_truncation():
    tok = ByteTokenizer()
    out = tok(["héllo", "hi"], padding=True, return_tensors="pt")
    assert out["input_ids"].shape == (2, 6)  # "é" is two UTF-8 bytes
    assert out["attention_mask"][1].tolist() == [1, 1, 0, 0, 0, 0]
    assert tok.decode(out["input_ids"][0]) == "héllo"
    assert tok("abcdef", truncation=True, max_length=3)["input_ids"] == [[97, 98, 99]]
    with pytest.raises(ValueError, match="padding=True"):
        tok(["a", "abc"], return_tensors="pt")


def test_unknown_builtin_names_are_refused(tmp_path):
    with pytest.raises(InputError, match="builtin:digits-cnn, builtin:tiny-lm"):
        load_model("builtin:resnet", device="cpu", cache_dir=tmp_path)
    with pytest.raises(InputError, match="accepted: digits, text"):
        builtin_calibration("imagenet")
