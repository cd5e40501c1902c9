"""Regression tests of issue 7's upload findings: refused uploads leave nothing on disk, hostile
files are 4xx problems without server paths, UTF-8 names round-trip, job fields are bounded."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from bitplan.app.settings import Settings
from tests.app._api_fixtures import api_client, assert_problem, job_body


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with api_client(settings) as client:
        yield client


@pytest.fixture(scope="module")
def bert_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files of a 1-layer BERT folder with random weights (no download)."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert")
    config = BertConfig(
        vocab_size=32,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _upload(client: TestClient, kind: str, name: str, data: bytes) -> httpx.Response:
    return client.post(f"/v1/{kind}", files={"file": (name, data)})


def _all_files(settings: Settings) -> set[Path]:
    roots = [settings.upload_dir, settings.cache_dir]
    return {p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(autouse=True)
def _files_before(settings: Settings) -> Iterator[None]:
    """The cache is shared with other tests (trained models, sensitivity tables): only files
    that appear during a test can be its upload's leftovers."""
    _BEFORE.clear()
    _BEFORE.update(_all_files(settings))
    yield


_BEFORE: set[Path] = set()


def _files_left(settings: Settings) -> list[Path]:
    """Files the test's uploads left under the upload and cache folders (empty folders do
    not count)."""
    return sorted(_all_files(settings) - _BEFORE)


def _assert_no_server_path(problem: dict[str, object], settings: Settings) -> None:
    text = json.dumps(problem)
    assert str(settings.data_dir) not in text and "/tmp" not in text, text


def test_config_larger_than_its_weights_is_refused_fast_and_leaves_nothing(
    client: TestClient, settings: Settings, bert_files: dict[str, bytes]
) -> None:
    config = json.loads(bert_files["config.json"])
    config["num_hidden_layers"] = 100_000
    files = {**bert_files, "config.json": json.dumps(config).encode()}
    problem = assert_problem(_upload(client, "models", "huge.zip", _zip(files)), 422)
    # Building 100000 layers takes minutes; the header check answers in well under that.
    assert "100000 layers" in problem["detail"] and "huge.zip" in problem["detail"]
    _assert_no_server_path(problem, settings)
    assert _files_left(settings) == []


@pytest.mark.parametrize(
    ("label", "weights"),
    [
        ("empty", b""),
        ("short prefix", b"\x10\x00"),
        ("header longer than file", (1 << 40).to_bytes(8, "little") + b"{}"),
        ("header not JSON", (4).to_bytes(8, "little") + b"nope"),
        ("header a list", (2).to_bytes(8, "little") + b"[]"),
        ("unknown dtype", b'{"a":{"dtype":"X","shape":[1],"data_offsets":[0,4]}}'),
        ("offsets outside", b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,400]}}'),
        ("size mismatch", b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}'),
        ("negative shape", b'{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}'),
        ("deep header", b"[" * 100_000 + b"]" * 100_000),
    ],
)
def test_malformed_safetensors_in_a_zip_is_a_422_that_leaves_nothing(
    client: TestClient,
    settings: Settings,
    bert_files: dict[str, bytes],
    label: str,
    weights: bytes,
) -> None:
    if weights.startswith((b"{", b"[")):  # a header: prefix its length, add 4 bytes of data
        weights = len(weights).to_bytes(8, "little") + weights + b"\0" * 4
    files = {**bert_files, "model.safetensors": weights}
    problem = assert_problem(_upload(client, "models", "bad.zip", _zip(files)), 422)
    assert "bad.zip" in problem["detail"], label
    _assert_no_server_path(problem, settings)
    assert _files_left(settings) == []


def test_a_loader_crash_is_a_422_and_removes_the_upload(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError(f"boom in {settings.upload_dir}")

    monkeypatch.setattr("bitplan.app.uploads.load_model", crash)
    problem = assert_problem(_upload(client, "models", "m.zip", b"PK not really"), 422)
    assert "m.zip cannot be loaded" in problem["detail"]
    _assert_no_server_path(problem, settings)
    assert _files_left(settings) == []


@pytest.mark.parametrize("name", ["数据-€.jsonl", "données.jsonl"])
def test_utf8_file_names_round_trip(client: TestClient, name: str) -> None:
    response = _upload(client, "datasets", name, b'{"text": "hello"}\n')
    assert response.status_code == 201, response.text
    assert response.json()["filename"] == name
    assert client.get(response.headers["location"]).json()["filename"] == name


def test_deeply_nested_jsonl_is_a_422(client: TestClient, settings: Settings) -> None:
    line = b"[" * 100_000 + b"]" * 100_000
    problem = assert_problem(_upload(client, "datasets", "deep.jsonl", line), 422)
    assert "nested too deeply" in problem["detail"]
    assert _files_left(settings) == []


def test_malformed_safetensors_dataset_is_a_422(client: TestClient, settings: Settings) -> None:
    problem = assert_problem(_upload(client, "datasets", "x.safetensors", b"\xff" * 16), 422)
    assert "x.safetensors" in problem["detail"]
    assert _files_left(settings) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 10**24),
        ("seed", -1),
        ("trials", 10**12),
        ("timeout", 1e12),
        ("max_samples", 10**12),
        ("max_length", 10**12),
        ("exclude", ["x"] * 5000),
        ("model", "m" * 1000),
    ],
)
def test_job_fields_are_bounded(client: TestClient, field: str, value: object) -> None:
    assert_problem(client.post("/v1/jobs", json=job_body(**{field: value})), 422)


def test_openapi_shows_the_bounds(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]["JobCreate"]
    props = schema["properties"]
    assert props["trials"]["maximum"] >= 1 and props["seed"]["maximum"] < 2**64
    assert "maxItems" in props["exclude"] and "maxLength" in props["model"]
