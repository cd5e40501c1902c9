"""Calibration data: each loader, every input error, batching, and the seeded split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bitplan.sensitivity.builtin import builtin_calibration
from bitplan.sensitivity.data import CalibData, load_calibration, split_calibration
from bitplan.sensitivity.errors import InputError
from tests.sensitivity._data_fixtures import (
    Regressor,
    TextClassifier,
    digits_model,
    loaded,
    tiny_lm,
    word_tokenizer,
)


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _jsonl(path: Path, records: list[dict]) -> str:
    return _write(path, "\n".join(json.dumps(r) for r in records) + "\n")


def _digits_file(path: Path, n: int = 6, **extra: torch.Tensor) -> str:
    tensors = {"pixel_values": torch.rand(n, 1, 8, 8), "labels": torch.arange(n) % 10} | extra
    save_file({k: v for k, v in tensors.items() if v is not None}, path)
    return str(path)


# --- text -----------------------------------------------------------------------------------


def test_txt_lines_are_tokenized_padded_right_and_masked(tmp_path: Path) -> None:
    model = tiny_lm()
    ref = _write(tmp_path / "c.txt", "hello world\n\nab\n  \nxyz\n")
    data = load_calibration(ref, model, max_length=8)
    assert len(data) == 3 and data.labels is None
    ids, mask = data.inputs["input_ids"], data.inputs["attention_mask"]
    assert ids.shape == mask.shape == (3, 8)  # "hello world" truncated at 8 bytes
    assert ids[0].tolist() == list(b"hello wo")
    assert ids[1, :2].tolist() == list(b"ab") and ids[1, 2:].eq(0).all()
    assert mask.sum(1).tolist() == [8, 2, 3]


def test_txt_paragraphs_become_one_sample_each(tmp_path: Path) -> None:
    ref = _write(tmp_path / "p.txt", "first line\nsame para\n\nsecond para\n")
    data = load_calibration(ref, tiny_lm(), max_length=64)
    assert len(data) == 2
    first = bytes(data.inputs["input_ids"][0][data.inputs["attention_mask"][0].bool()].tolist())
    assert first == b"first line\nsame para"


def test_text_hash_depends_on_content_and_max_length(tmp_path: Path) -> None:
    model = tiny_lm()
    a = _write(tmp_path / "a.txt", "one\ntwo\n")
    b = _write(tmp_path / "b.txt", "one\ntwo\n")
    c = _write(tmp_path / "c.txt", "one\nthree\n")
    assert load_calibration(a, model).sha256 == load_calibration(b, model).sha256
    assert load_calibration(a, model).sha256 != load_calibration(c, model).sha256
    assert load_calibration(a, model).sha256 != load_calibration(a, model, max_length=2).sha256
    assert load_calibration(a, model).sha256 != load_calibration(a, model, max_samples=1).sha256


def test_max_length_is_capped_by_the_tokenizer(tmp_path: Path) -> None:
    ref = _write(tmp_path / "long.txt", "x" * 200 + "\n")
    data = load_calibration(ref, tiny_lm(), max_length=1000)
    assert data.inputs["input_ids"].shape == (1, 64)  # ByteTokenizer.model_max_length


def test_jsonl_labels_for_text_classification(tmp_path: Path) -> None:
    model = loaded(TextClassifier(), "text-classification", tokenizer=word_tokenizer())
    ref = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "the cat sat", "label": 2},
            {"text": "a dog", "label": 0},
            {"text": "ran far away on a mat", "label": 1},
        ],
    )
    data = load_calibration(ref, model, max_length=4)
    assert data.labels.tolist() == [2, 0, 1]
    # the classifier takes no token_type_ids: the tokenizer's extra output is dropped
    assert set(data.inputs) == {"input_ids", "attention_mask"}
    assert data.inputs["input_ids"].shape == (3, 4)
    assert data.inputs["input_ids"][1].tolist() == [6, 8, 0, 0]  # "a dog" + [PAD] [PAD]


def test_jsonl_labels_are_ignored_for_a_language_model(tmp_path: Path) -> None:
    ref = _jsonl(tmp_path / "d.jsonl", [{"text": "abc", "label": 1}, {"text": "de", "label": 0}])
    data = load_calibration(ref, tiny_lm())
    assert data.labels is None and len(data) == 2


def test_left_padding_follows_the_tokenizer(tmp_path: Path) -> None:
    tokenizer = word_tokenizer()
    tokenizer.padding_side = "left"
    model = loaded(TextClassifier(), "text-classification", tokenizer=tokenizer)
    data = load_calibration(_write(tmp_path / "t.txt", "the cat sat\na dog\n"), model)
    assert data.inputs["attention_mask"][1].tolist() == [0, 1, 1]
    assert data.inputs["input_ids"][1].tolist() == [0, 6, 8]


@pytest.mark.parametrize(
    "records, match",
    [
        (['{"text": "ok", "label": 1}', "not json"], "line 2 is not valid JSON"),
        (['{"label": 1}'], 'no "text"'),
        (['{"text": "ok", "label": 1}', '{"text": "no label"}'], 'line 2 has no "label"'),
        (['{"text": "ok", "label": "positive"}'], "class index"),
        (['{"text": "ok", "label": -1}'], "class index"),
    ],
)
def test_jsonl_errors(tmp_path: Path, records: list[str], match: str) -> None:
    model = loaded(TextClassifier(), "text-classification", tokenizer=word_tokenizer())
    ref = _write(tmp_path / "bad.jsonl", "\n".join(records) + "\n")
    with pytest.raises(InputError, match=match):
        load_calibration(ref, model)


def test_text_needs_a_tokenizer(tmp_path: Path) -> None:
    ref = _write(tmp_path / "t.txt", "some text\n")
    with pytest.raises(InputError, match="has no tokenizer.*safetensors"):
        load_calibration(ref, digits_model())


@pytest.mark.parametrize(
    "name, content",
    [
        ("e.txt", ""),
        ("w.txt", "\n   \n\n"),
        ("e.jsonl", "\n"),
        ("e.safetensors", ""),
    ],
)
def test_empty_files_are_rejected(tmp_path: Path, name: str, content: str) -> None:
    with pytest.raises(InputError, match="empty"):
        load_calibration(_write(tmp_path / name, content), tiny_lm())


# --- safetensors ----------------------------------------------------------------------------


def test_safetensors_inputs_and_labels(tmp_path: Path) -> None:
    ref = _digits_file(tmp_path / "d.safetensors", n=6)
    data = load_calibration(ref, digits_model())
    assert data.inputs["pixel_values"].shape == (6, 1, 8, 8)
    assert data.labels.tolist() == [0, 1, 2, 3, 4, 5]
    few = load_calibration(ref, digits_model(), max_samples=4)
    assert len(few) == 4 and few.labels.tolist() == [0, 1, 2, 3]
    assert torch.equal(few.inputs["pixel_values"], data.inputs["pixel_values"][:4])
    assert few.sha256 != data.sha256


def test_floating_inputs_take_the_model_dtype(tmp_path: Path) -> None:
    model = digits_model()
    model.module.to(torch.bfloat16)
    data = load_calibration(_digits_file(tmp_path / "d.safetensors"), model)
    assert data.inputs["pixel_values"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"labels": torch.arange(5)}, r"disagree.*pixel_values=6, labels=5"),
        (
            {"pixel_mask": torch.ones(6, 8)},
            r"pixel_mask not among the inputs.*accepted: pixel_values",
        ),
        ({"labels": torch.zeros(6, 2, dtype=torch.long)}, r"1-D integer"),
        ({"labels": torch.rand(6)}, r"1-D integer"),
        ({"pixel_values": torch.full((6, 1, 8, 8), float("nan"))}, "NaN or Inf"),
        ({"pixel_values": torch.full((6, 1, 8, 8), float("inf"))}, "NaN or Inf"),
    ],
)
def test_safetensors_errors(tmp_path: Path, extra: dict, match: str) -> None:
    ref = _digits_file(tmp_path / "bad.safetensors", n=6, **extra)
    with pytest.raises(InputError, match=match):
        load_calibration(ref, digits_model())


def test_safetensors_missing_required_input(tmp_path: Path) -> None:
    save_file({"labels": torch.arange(3)}, tmp_path / "l.safetensors")
    with pytest.raises(InputError, match="no input tensors"):
        load_calibration(str(tmp_path / "l.safetensors"), digits_model())
    save_file({"y": torch.rand(3, 4)}, tmp_path / "y.safetensors")
    with pytest.raises(InputError, match="y not among the inputs"):
        load_calibration(str(tmp_path / "y.safetensors"), loaded(Regressor(), "tensor"))


def test_garbage_safetensors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a valid safetensors"):
        load_calibration(_write(tmp_path / "g.safetensors", "garbage"), digits_model())


# --- builtin and dispatch -------------------------------------------------------------------


def test_builtin_loads_the_models_dataset() -> None:
    data = load_calibration("builtin", digits_model(), max_samples=20)
    inputs, labels = builtin_calibration("digits")
    assert len(data) == 20
    assert torch.equal(data.inputs["pixel_values"], inputs["pixel_values"][:20])
    assert torch.equal(data.labels, labels[:20])
    assert data.sha256 == load_calibration("builtin", digits_model(), max_samples=20).sha256
    assert data.sha256 != load_calibration("builtin", digits_model(), max_samples=21).sha256


def test_builtin_needs_builtin_data() -> None:
    with pytest.raises(InputError, match="no builtin calibration data"):
        load_calibration("builtin", tiny_lm())


@pytest.mark.parametrize(
    "ref, match",
    [
        ("data.csv", "unsupported calibration data"),
        ("missing.txt", "not found"),
    ],
)
def test_bad_refs(tmp_path: Path, ref: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        load_calibration(str(tmp_path / ref), tiny_lm())


@pytest.mark.parametrize("kwargs", [{"max_samples": 0}, {"max_length": 0}])
def test_bad_limits(kwargs: dict) -> None:
    with pytest.raises(InputError, match="must be"):
        load_calibration("builtin", digits_model(), **kwargs)


# --- CalibData ------------------------------------------------------------------------------


def _numbered(n: int) -> CalibData:
    return CalibData(
        inputs={"x": torch.arange(n, dtype=torch.float32)[:, None]},
        labels=torch.arange(n),
        sha256="s",
    )


def test_batches_are_in_order_and_trim_shared_padding() -> None:
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    ids = torch.arange(12).view(3, 4)  # (N, T)
    data = CalibData(
        inputs={"input_ids": ids, "attention_mask": mask, "flag": torch.ones(3)},
        labels=None,
        sha256="s",
    )
    first, second = list(data.batches(2, device="cpu"))
    assert first["input_ids"].tolist() == [[0, 1], [4, 5]]
    assert first["attention_mask"].shape == (2, 2) and first["flag"].shape == (2,)
    assert second["input_ids"].tolist() == [[8, 9, 10]]
    with pytest.raises(ValueError):
        next(_numbered(3).batches(0))


def test_split_is_seeded_disjoint_and_complete() -> None:
    data = _numbered(40)
    calib, held = split_calibration(data, holdout=0.25, seed=3)
    again_calib, again_held = split_calibration(data, holdout=0.25, seed=3)
    assert (len(calib), len(held)) == (30, 10)
    assert torch.equal(calib.labels, again_calib.labels)
    assert torch.equal(held.labels, again_held.labels)
    assert sorted(calib.labels.tolist() + held.labels.tolist()) == list(range(40))
    assert calib.labels.tolist() == sorted(calib.labels.tolist())  # original order kept
    assert torch.equal(calib.inputs["x"][:, 0].long(), calib.labels)
    other = split_calibration(data, holdout=0.25, seed=4)[1]
    assert not torch.equal(other.labels, held.labels)
    assert len({calib.sha256, held.sha256, other.sha256, data.sha256}) == 4


@pytest.mark.parametrize("n, holdout, needed", [(1, 0.25, 2), (2, 0.1, 5), (4, 0.9, 6)])
def test_split_too_few_samples_says_how_many(n: int, holdout: float, needed: int) -> None:
    with pytest.raises(InputError, match=f"at least {needed} are needed"):
        split_calibration(_numbered(n), holdout=holdout)
    calib, held = split_calibration(_numbered(needed), holdout=holdout)
    assert len(calib) >= 1 and len(held) >= 1


def test_split_rejects_bad_fractions() -> None:
    with pytest.raises(InputError, match=r"fraction in \(0, 1\)"):
        split_calibration(_numbered(10), holdout=1.0)
