"""Hugging Face folders and zips: task inference, dtype, tie groups, hashes, and every refusal."""

from __future__ import annotations

import json
import os
import stat
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.hf import infer_task
from bitplan.sensitivity.models import load_model
from bitplan.sensitivity.safety import extract_zip
from tests.helpers import SENTENCES, zip_folder


def _load(ref: Path | str, cache: Path, **kwargs):
    return load_model(str(ref), device="cpu", cache_dir=cache, **kwargs)


def _edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("model_type", "task", "output"),
    [
        ("bert", "feature-extraction", "last_hidden_state"),
        ("gpt2", "text-generation", "logits"),
        ("llama", "text-classification", "logits"),
    ],
)
def test_task_is_inferred_and_model_runs(tiny_hf_model, tmp_path, model_type, task, output):
    folder = tiny_hf_model(model_type, task=task)
    model = _load(folder, tmp_path)
    assert model.task == task and model.builtin_data is None
    assert not model.module.training
    batch = model.tokenizer(list(SENTENCES[:2]), padding=True, return_tensors="pt")
    with torch.no_grad():
        out = getattr(model.module(**batch), output)
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_infer_task_from_architectures():
    assert infer_task(["GPT2LMHeadModel"]) == "text-generation"
    assert infer_task(["LlamaForCausalLM"]) == "text-generation"
    assert infer_task(["BertForSequenceClassification"]) == "text-classification"
    assert infer_task(["BertModel"]) == "feature-extraction"
    assert infer_task(None) == "feature-extraction"


def test_gpt2_conv1d_layers_and_tied_head(tiny_hf_model, tmp_path):
    model = _load(tiny_hf_model("gpt2", task="text-generation"), tmp_path)
    by_name = {lay.name: lay for lay in model.layers}
    attn = by_name["transformer.h.0.attn.c_attn"]
    assert attn.kind == "hf_conv1d" and attn.shape == (96, 32)  # q,k,v stacked: 3 x 32 rows
    head, wte = by_name["lm_head"], by_name["transformer.wte"]
    assert head.tie == wte.tie == "transformer.wte.weight" and head.group == wte.group
    assert model.module.get_submodule("lm_head").weight is model.module.transformer.wte.weight


def test_checkpoint_dtype_is_kept(tiny_hf_model, tmp_path):
    model = _load(tiny_hf_model("llama", task="text-generation", dtype=torch.bfloat16), tmp_path)
    assert {p.dtype for p in model.module.parameters()} == {torch.bfloat16}


def test_classifier_checkpoint_loads_as_encoder(tiny_hf_model, tmp_path):
    folder = tiny_hf_model("bert", task="text-classification")
    model = _load(folder, tmp_path, task="feature-extraction")
    assert model.task == "feature-extraction"
    assert not any(lay.name.startswith("classifier") for lay in model.layers)
    classifier = _load(folder, tmp_path)
    assert classifier.task == "text-classification"
    assert "classifier" in {lay.name for lay in classifier.layers}
    assert classifier.sha256 != model.sha256  # caches must not mix the two models


def test_sha256_is_content_hash_shared_by_folder_and_zip(tiny_hf_model, tmp_path):
    folder = tiny_hf_model("bert")
    first = _load(folder, tmp_path).sha256
    assert _load(folder, tmp_path).sha256 == first
    zipped = zip_folder(folder, tmp_path / "m.zip", prefix="my-model/")
    assert _load(zipped, tmp_path / "cache").sha256 == first
    _edit_weights(folder, lambda t: t["pooler.dense.bias"].add_(1.0))
    assert _load(folder, tmp_path).sha256 != first


def test_zip_is_extracted_once_keyed_by_content(tiny_hf_model, tmp_path):
    zipped = zip_folder(tiny_hf_model("gpt2", task="text-generation"), tmp_path / "m.zip")
    _load(zipped, tmp_path / "cache")
    (extracted,) = (tmp_path / "cache" / "unzipped").iterdir()
    marker = extracted / "marker"
    marker.write_text("kept")
    _load(zipped, tmp_path / "cache")
    assert marker.read_text() == "kept"  # reused, not extracted again


# ---- refusals: each bad input is one InputError line ----------------------------------------


def _assert_refused(match: str, ref, cache: Path, **kwargs) -> None:
    with pytest.raises(InputError, match=match) as info:
        _load(ref, cache, **kwargs)
    assert "\n" not in str(info.value)


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_refused("no config.json", tmp_path / "empty", tmp_path)


def test_missing_path_and_unknown_file_are_refused(tmp_path):
    _assert_refused("'.*nope' does not exist: no such file or folder", tmp_path / "nope", tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    _assert_refused("is not a model", tmp_path / "notes.txt", tmp_path)


def test_unknown_model_type_is_refused(tiny_hf_model, tmp_path):
    folder = tiny_hf_model("bert")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (folder / "config.json").write_text(json.dumps(config))
    _assert_refused("unknown model_type 'no-such-architecture'", folder, tmp_path)


def test_invalid_config_json_is_refused(tiny_hf_model, tmp_path):
    folder = tiny_hf_model("bert", tokenizer=False)
    (folder / "config.json").write_text("{not json")
    _assert_refused("not valid JSON", folder, tmp_path)


def test_folder_without_safetensors_is_refused(tiny_hf_model, tmp_path):
    folder = tiny_hf_model("bert", tokenizer=False)
    (folder / "model.safetensors").unlink()
    _assert_refused("no \\*.safetensors", folder, tmp_path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda t: t.__setitem__("transformer.h.0.mlp.c_fc.weight", torch.zeros(32, 7)),
            "other shapes, e.g. transformer.h.0.mlp.c_fc.weight",
        ),
        (
            lambda t: t.pop("transformer.h.1.attn.c_proj.weight"),
            "missing weights transformer.h.1.attn.c_proj.weight",
        ),
        (
            lambda t: t.__setitem__("transformer.h.9.extra", torch.zeros(3)),
            "unused by the model: transformer.h.9.extra",
        ),
    ],
    ids=["mismatched", "missing", "unexpected"],
)
def test_safetensors_that_do_not_match_config_are_refused(tiny_hf_model, tmp_path, edit, match):
    folder = tiny_hf_model("gpt2", task="text-generation")
    _edit_weights(folder, edit)
    _assert_refused(match, folder, tmp_path)


def test_encoder_checkpoint_as_classifier_is_refused(tiny_hf_model, tmp_path):
    folder = tiny_hf_model("bert", task="feature-extraction")
    _assert_refused("missing weights classifier", folder, tmp_path, task="text-classification")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tiny_hf_model, tmp_path, bad):
    folder = tiny_hf_model("bert")
    _edit_weights(
        folder, lambda t: t["encoder.layer.1.output.dense.weight"].view(-1).__setitem__(5, bad)
    )
    _assert_refused("encoder.layer.1.output.dense.weight contains NaN or Inf", folder, tmp_path)


def test_image_task_for_hf_model_is_refused(tiny_hf_model, tmp_path):
    _assert_refused(
        "not available for Hugging Face",
        tiny_hf_model("bert"),
        tmp_path,
        task="image-classification",
    )


# ---- zip safety --------------------------------------------------------------------------------


def _zip_with(path: Path, name: str, data: bytes = b"x", *, mode: int | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", "{}")
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.external_attr = mode << 16
        archive.writestr(info, data)
    return path


@pytest.mark.parametrize(
    ("name", "mode", "match"),
    [
        ("../evil.txt", None, "outside the archive"),
        ("a/../../evil.txt", None, "outside the archive"),
        ("/etc/evil", None, "absolute path"),
        ("link", stat.S_IFLNK | 0o777, "symbolic link"),
    ],
)
def test_unsafe_zip_members_are_refused(tmp_path, name, mode, match):
    archive = _zip_with(tmp_path / "bad.zip", name, b"../../target", mode=mode)
    _assert_refused(match, archive, tmp_path / "cache")
    assert not (tmp_path / "evil.txt").exists()
    assert list((tmp_path / "cache" / "unzipped").iterdir()) == []  # nothing left behind


def test_zip_over_the_declared_size_limit_is_refused(tmp_path, monkeypatch):
    archive = _zip_with(tmp_path / "big.zip", "model.safetensors", bytes(1 << 20))
    _assert_refused("declares .* over the limit of 1000", archive, tmp_path, max_unzip_bytes=1000)
    monkeypatch.setenv("BITPLAN_MAX_UNZIP_BYTES", "2000")
    _assert_refused("over the limit of 2000", archive, tmp_path)


def test_zip_member_that_lies_about_its_size_is_refused(tmp_path):
    archive = _zip_with(tmp_path / "liar.zip", "weights.bin", bytes(4096))
    raw = bytearray(archive.read_bytes())
    # Shrink the declared uncompressed size of weights.bin (the second entry) to 16 bytes in the
    # local header (size at offset 22) and the central directory (offset 24).
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = raw.index(signature, raw.index(signature) + 1)
        raw[at + offset : at + offset + 4] = struct.pack("<I", 16)
    archive.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="liar.zip"):
        extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_zip_without_model_folder_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "m.zip", "w") as archive:
        archive.writestr("a/config.json", "{}")
        archive.writestr("b/config.json", "{}")
    _assert_refused("one model folder", tmp_path / "m.zip", tmp_path)


def test_corrupt_zip_is_refused(tmp_path):
    (tmp_path / "junk.zip").write_bytes(os.urandom(64))
    _assert_refused("not a readable zip", tmp_path / "junk.zip", tmp_path)
