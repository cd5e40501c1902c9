"""Regression tests of issue 7's upload findings: refused uploads leave nothing on disk, hostile
files are 4xx problems without server paths, UTF-8 names round-trip, job fields are bounded."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from bitplan.app.settings import Settings
from bitplan.app.upload_check import check_model
from bitplan.sensitivity.errors import InputError
from tests.app._api_fixtures import api_client, assert_problem, job_body
from tests.helpers import tiny_bert_files, zip_bytes


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with api_client(settings) as client:
        yield client


@pytest.fixture(scope="module")
def bert_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files of a 1-layer BERT folder with random weights (no download)."""
    return tiny_bert_files(tmp_path_factory.mktemp("bert"))


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


def _rss_bytes() -> int:
    """This process's resident memory now (Linux ``/proc``): the API's, under TestClient."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _no_loading_here(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("a model was loaded in the API process")


def test_config_larger_than_its_weights_is_refused_by_a_child_and_leaves_nothing(
    client: TestClient,
    settings: Settings,
    bert_files: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Loading in the API process would fail here, so the message can only come from a child.
    monkeypatch.setattr("bitplan.sensitivity.models.load_model", _no_loading_here)
    config = json.loads(bert_files["config.json"])
    config["num_hidden_layers"] = 100_000
    files = {**bert_files, "config.json": json.dumps(config).encode()}
    before = _rss_bytes()
    problem = assert_problem(_upload(client, "models", "huge.zip", zip_bytes(files)), 422)
    # Building 100000 layers would take minutes; the loader's size check refuses it first.
    assert "100000 layers" in problem["detail"] and "huge.zip" in problem["detail"]
    _assert_no_server_path(problem, settings)
    assert _files_left(settings) == []
    # The model is loaded in a child process: the API's own memory barely moves.
    assert _rss_bytes() - before < 256 << 20


# The header problems a loader must refuse, each with a name; the first two also go through
# the API below (each API upload is checked in a fresh child process, seconds apiece).
_BAD_WEIGHTS = {
    "empty": b"",
    "short prefix": b"\x10\x00",
    "header longer than file": (1 << 40).to_bytes(8, "little") + b"{}",
    "header not JSON": (4).to_bytes(8, "little") + b"nope",
    "header a list": (2).to_bytes(8, "little") + b"[]",
    "unknown dtype": b'{"a":{"dtype":"X","shape":[1],"data_offsets":[0,4]}}',
    "offsets outside": b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,400]}}',
    "size mismatch": b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}',
    "negative shape": b'{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}',
    "deep header": b"[" * 100_000 + b"]" * 100_000,
}


def _with_weights(bert_files: dict[str, bytes], weights: bytes) -> dict[str, bytes]:
    if weights.startswith((b"{", b"[")):  # a header: prefix its length, add 4 bytes of data
        weights = len(weights).to_bytes(8, "little") + weights + b"\0" * 4
    return {**bert_files, "model.safetensors": weights}


@pytest.mark.parametrize("label", _BAD_WEIGHTS)
def test_malformed_safetensors_in_a_zip_is_refused_by_the_check(
    tmp_path: Path, bert_files: dict[str, bytes], label: str
) -> None:
    archive = tmp_path / "bad.zip"
    archive.write_bytes(zip_bytes(_with_weights(bert_files, _BAD_WEIGHTS[label])))
    with pytest.raises(InputError, match="bad.zip"):
        check_model(archive, trusted=False, cache_dir=tmp_path / "scratch")


@pytest.mark.parametrize("label", list(_BAD_WEIGHTS)[:2])
def test_malformed_safetensors_in_a_zip_is_a_422_that_leaves_nothing(
    client: TestClient, settings: Settings, bert_files: dict[str, bytes], label: str
) -> None:
    files = _with_weights(bert_files, _BAD_WEIGHTS[label])
    problem = assert_problem(_upload(client, "models", "bad.zip", zip_bytes(files)), 422)
    assert "bad.zip" in problem["detail"], label
    _assert_no_server_path(problem, settings)
    assert _files_left(settings) == []


def test_a_loader_crash_is_a_422_and_removes_the_upload(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in check that reports what the real one reports when a loader raises something
    # other than InputError (its type only: a library's message may hold any server path).
    monkeypatch.setattr("bitplan.app.validation.CHILD_MODULE", "tests.app._fake_upload_check")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    monkeypatch.setenv("BITPLAN_TEST_CHECK", "failed")
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
