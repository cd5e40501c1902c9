"""load_model: references, devices, cache dir, layer listing, exclusions, pins, torch files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.layers import find_quant_layers
from bitplan.sensitivity.models import TASKS, load_model, resolve_cache_dir, resolve_device


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="accepted: auto, cpu, cuda"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_device("cuda")


def test_resolve_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("BITPLAN_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("BITPLAN_CACHE_DIR")
    assert resolve_cache_dir().name == "bitplan"


def test_digits_cnn_layers(digits_model):
    assert digits_model.task == "image-classification" and digits_model.builtin_data == "digits"
    assert digits_model.device == torch.device("cpu") and digits_model.tokenizer is None
    kinds = {lay.name: (lay.kind, lay.shape) for lay in digits_model.layers}
    assert kinds["conv2"] == ("conv2d", (32, 16 * 3 * 3))  # (out, in·kh·kw)
    assert kinds["fc1"] == ("linear", (128, 512))
    assert len(kinds) >= 5 and all(lay.tie is None for lay in digits_model.layers)
    assert len(digits_model.sha256) == 64


def test_layer_kinds_conv1d_and_embedding():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Conv1d(4, 6, kernel_size=3), nn.Linear(6, 2))
    layers = find_quant_layers(model)
    assert [(lay.kind, lay.shape) for lay in layers] == [
        ("embedding", (10, 4)),
        ("conv1d", (6, 12)),
        ("linear", (2, 6)),
    ]


def test_exclude_patterns(bitplan_cache_dir):
    model = load_model(
        "builtin:digits-cnn", device="cpu", exclude=["fc*"], cache_dir=bitplan_cache_dir
    )
    assert [lay.name for lay in model.layers] == ["conv1", "conv2", "conv3"]
    with pytest.raises(InputError, match="exclude pattern 'dense\\*' matches no"):
        load_model(
            "builtin:digits-cnn", device="cpu", exclude=["dense*"], cache_dir=bitplan_cache_dir
        )
    with pytest.raises(InputError, match="list of patterns"):
        load_model("builtin:digits-cnn", device="cpu", exclude="fc*", cache_dir=bitplan_cache_dir)
    with pytest.raises(InputError, match="leave no layer"):
        load_model("builtin:digits-cnn", device="cpu", exclude=["*"], cache_dir=bitplan_cache_dir)


def test_excluding_one_tied_member_excludes_the_group(bitplan_cache_dir):
    model = load_model(
        "builtin:tiny-lm", device="cpu", exclude=["lm_head"], cache_dir=bitplan_cache_dir
    )
    assert not {"lm_head", "wte"} & {lay.name for lay in model.layers}


def test_pins(bitplan_cache_dir):
    model = load_model(
        "builtin:tiny-lm",
        device="cpu",
        cache_dir=bitplan_cache_dir,
        pins={"lm_head": "int8", "blocks.0.*": "fp16"},
    )
    pinned = {lay.name: lay.pinned for lay in model.layers}
    assert pinned["wte"] == "int8"  # tied to lm_head: one group, one format
    assert pinned["blocks.0.attn.q_proj"] == "fp16" and pinned["blocks.1.fc_in"] is None


@pytest.mark.parametrize(
    ("pins", "match"),
    [
        ({"conv1": "int7"}, "unsupported format 'int7'"),
        ({"nothing*": "int8"}, "matches no quantizable layer"),
        ({"conv*": "int8", "conv1": "int4"}, "pinned to both"),
    ],
)
def test_bad_pins_are_refused(bitplan_cache_dir, pins, match):
    with pytest.raises(InputError, match=match):
        load_model("builtin:digits-cnn", device="cpu", pins=pins, cache_dir=bitplan_cache_dir)


def test_bad_task_is_refused(bitplan_cache_dir):
    with pytest.raises(InputError, match="accepted: " + ", ".join(TASKS)):
        load_model(
            "builtin:digits-cnn", device="cpu", task="translation", cache_dir=bitplan_cache_dir
        )
    with pytest.raises(InputError, match="has task image-classification"):
        load_model(
            "builtin:digits-cnn", device="cpu", task="text-generation", cache_dir=bitplan_cache_dir
        )


def _export(model: nn.Module, path: Path) -> Path:
    program = torch.export.export(model, (torch.zeros(2, 4),))
    torch.export.save(program, path)
    return path


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_code_carrying_archives_need_trusted_mode(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3))
    exported = _export(model, tmp_path / "m.pt2")
    scripted = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(model), scripted)
    for path in (exported, scripted):
        with pytest.raises(InputError, match="unless the operator enables trusted mode"):
            load_model(str(path), device="cpu", cache_dir=tmp_path)
        with pytest.raises(InputError, match="do not keep layer types"):
            load_model(str(path), device="cpu", cache_dir=tmp_path, trusted=True)


@pytest.mark.parametrize("zipped", [True, False])  # torch.save's current and legacy formats
def test_pickled_state_dict_is_refused(tmp_path, zipped):
    path = tmp_path / "weights.bin"
    torch.save(nn.Linear(4, 3).state_dict(), path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(InputError, match="pickled state dict .torch.save., which has no arch"):
        load_model(str(path), device="cpu", cache_dir=tmp_path, trusted=True)


def test_random_bytes_named_bin_are_not_called_a_state_dict(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError, match="weights.bin is not a loadable state dict") as info:
        load_model(str(path), device="cpu", cache_dir=tmp_path)
    assert "pickled" not in str(info.value) and "Hugging Face folder" in str(info.value)
