"""HTTP tests of /v1/models and /v1/datasets: streaming upload, limits, dedup, validation."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as save_safetensors

from bitplan.app.settings import Settings
from tests.app._api_fixtures import api_client, assert_problem, job_body
from tests.helpers import tiny_bert_files, zip_bytes


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with api_client(settings) as client:
        yield client


def _upload(client: TestClient, kind: str, name: str, data: bytes) -> httpx.Response:
    return client.post(f"/v1/{kind}", files={"file": (name, data)})


@pytest.fixture(scope="module")
def tiny_bert_zip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A zipped Hugging Face folder of a 1-layer BERT with random weights (no download)."""
    return zip_bytes(tiny_bert_files(tmp_path_factory.mktemp("bert")))


def test_model_upload_is_validated_content_addressed_and_deletable(
    client: TestClient, tiny_bert_zip: bytes, settings: Settings
) -> None:
    first = _upload(client, "models", "bert.zip", tiny_bert_zip)
    assert first.status_code == 201, first.text
    model = first.json()
    assert first.headers["location"] == f"/v1/models/{model['id']}"
    assert model["filename"] == "bert.zip" and model["size_bytes"] == len(tiny_bert_zip)
    again = _upload(client, "models", "renamed.zip", tiny_bert_zip)
    assert again.status_code == 200 and again.json()["id"] == model["id"]
    assert client.get(f"/v1/models/{model['id']}").json()["sha256"] == model["sha256"]
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [model["id"]]
    stored = list(settings.upload_dir.rglob(f"{model['sha256']}.zip"))
    assert len(stored) == 1
    job = client.post("/v1/jobs", json=job_body(model=model["id"], calib="builtin"))
    assert job.status_code == 202 and job.json()["request"]["model"] == model["id"]
    assert_problem(client.delete(f"/v1/models/{model['id']}"), 409)  # a queued job needs it
    client.post(f"/v1/jobs/{job.json()['id']}:cancel")
    assert client.delete(f"/v1/models/{model['id']}").status_code == 204
    assert not stored[0].exists()
    assert_problem(client.get(f"/v1/models/{model['id']}"), 404)
    assert client.get(f"/v1/jobs/{job.json()['id']}").json()["request"]["model"] == "deleted"


def test_unloadable_model_is_refused_with_the_loaders_message(
    client: TestClient, settings: Settings
) -> None:
    folder = settings.data_dir / "scratch"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("no model here")
    with zipfile.ZipFile(folder / "empty.zip", "w") as zf:
        zf.write(folder / "notes.txt", "notes.txt")
    archive = (folder / "empty.zip").read_bytes()
    body = assert_problem(_upload(client, "models", "mine.zip", archive), 422)
    assert "config.json" in body["detail"] and "mine.zip" in body["detail"]
    assert str(settings.upload_dir) not in body["detail"]  # no server paths leak
    body = assert_problem(_upload(client, "models", "weights.pt", b"\x80\x02}q\x00."), 422)
    assert "weights.pt" in body["detail"]
    assert client.get("/v1/models").json()["data"] == []
    assert [p for p in settings.upload_dir.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("calib.txt", b"the cat sat\non the mat\n"),
        ("calib.jsonl", b'{"text": "hello", "label": 1}\n{"text": "world", "label": 0}\n'),
        ("calib.safetensors", save_safetensors({"pixel_values": torch.zeros(2, 1, 8, 8)})),
    ],
)
def test_dataset_formats_are_accepted(client: TestClient, name: str, data: bytes) -> None:
    response = _upload(client, "datasets", name, data)
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert client.get(f"/v1/datasets/{dataset['id']}").json()["filename"] == name
    job = client.post("/v1/jobs", json=job_body(calib=dataset["id"]))
    assert job.status_code == 202 and job.json()["request"]["calib"] == dataset["id"]


@pytest.mark.parametrize(
    ("name", "data", "needle"),
    [
        ("calib.csv", b"a,b\n1,2\n", ".jsonl"),
        ("calib.txt", b"", "empty"),
        ("calib.txt", b"\xff\xfe\x00bad", "UTF-8"),
        ("calib.jsonl", b'{"text": "ok"}\nnot json\n', "line 2"),
        ("calib.safetensors", b"garbage-bytes", "safetensors"),
    ],
)
def test_bad_datasets_are_422(client: TestClient, name: str, data: bytes, needle: str) -> None:
    body = assert_problem(_upload(client, "datasets", name, data), 422)
    assert needle in body["detail"]


def test_the_same_bytes_under_another_suffix_answer_the_first_upload_and_leave_one_file(
    client: TestClient, settings: Settings
) -> None:
    first = _upload(client, "datasets", "calib.txt", b"the cat sat\n")
    assert first.status_code == 201, first.text
    again = _upload(client, "datasets", "calib.text", b"the cat sat\n")  # stored as <sha>.text
    assert again.status_code == 200 and again.json() == first.json()
    stored = [p.name for p in settings.upload_dir.rglob("*") if p.is_file()]
    assert stored == [f"{first.json()['sha256']}.txt"]


def test_upload_over_the_limit_is_413_and_leaves_nothing(settings: Settings) -> None:
    small = settings.model_copy(update={"max_upload_bytes": 1000})
    with api_client(small) as client:
        body = assert_problem(_upload(client, "datasets", "big.txt", b"x\n" * 600), 413)
        assert body["max_bytes"] == 1000
        exact = _upload(client, "datasets", "fits.txt", b"y\n" * 500)
        assert exact.status_code == 201 and exact.json()["size_bytes"] == 1000

        def chunks() -> Iterator[bytes]:  # no Content-Length: the running count must catch it
            yield b"--B\r\nContent-Disposition: form-data; name=file; filename=s.txt\r\n\r\n"
            for _ in range(20):
                yield b"z\n" * 100
            yield b"\r\n--B--\r\n"

        streamed = client.post(
            "/v1/datasets",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=B"},
        )
        assert_problem(streamed, 413)
    leftovers = [p.name for p in small.upload_dir.rglob("*") if p.is_file()]
    assert leftovers == [f"{exact.json()['sha256']}.txt"]


def test_upload_needs_multipart_with_a_file_field(client: TestClient) -> None:
    assert_problem(
        client.post("/v1/datasets", content=b"raw", headers={"content-type": "text/plain"}), 415
    )
    body = assert_problem(
        client.post("/v1/datasets", data={"other": "x"}, files={"not_file": ("a.txt", b"abc")}), 422
    )
    assert "'file'" in body["detail"]


def test_list_pages_uploads(client: TestClient) -> None:
    ids = [
        _upload(client, "datasets", f"d{i}.txt", f"sample {i}\n".encode()).json()["id"]
        for i in range(3)
    ]
    first = client.get("/v1/datasets", params={"limit": 2}).json()
    second = client.get("/v1/datasets", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [d["id"] for d in first["data"] + second["data"]] == ids[::-1]
    assert second["next_cursor"] is None
    assert first["data"][0]["filename"] == "d2.txt"


def test_list_filters_by_sha256(client: TestClient) -> None:
    uploads = [_upload(client, "datasets", f"s{i}.txt", f"text {i}\n".encode()) for i in range(3)]
    oldest = uploads[0].json()
    for sha in (oldest["sha256"], oldest["sha256"].upper()):
        found = client.get("/v1/datasets", params={"sha256": sha, "limit": 1}).json()
        assert found == {"data": [oldest], "next_cursor": None}  # not the newest: the match
    assert client.get("/v1/models", params={"sha256": oldest["sha256"]}).json()["data"] == []
    assert client.get("/v1/datasets", params={"sha256": "0" * 64}).json()["data"] == []


@pytest.mark.parametrize("sha", ["abc", "g" * 64, "0" * 65, ""])
def test_sha256_filter_must_be_64_hex_digits(client: TestClient, sha: str) -> None:
    body = assert_problem(client.get("/v1/datasets", params={"sha256": sha}), 422)
    assert body["errors"][0]["loc"] == "query.sha256"


def test_sha256_filter_sees_only_the_callers_uploads(settings: Settings) -> None:
    from bitplan.app import crud

    with api_client(settings.model_copy(update={"auth": "on"})) as client:
        with client.app.state.sessionmaker() as session:  # type: ignore[attr-defined]
            keys = [crud.create_api_key(session, name=name)[1] for name in ("a", "b")]
        key_a, key_b = ({"Authorization": f"Bearer {key}"} for key in keys)
        mine = client.post("/v1/datasets", files={"file": ("a.txt", b"a's\n")}, headers=key_a)
        query = {"sha256": mine.json()["sha256"]}
        assert client.get("/v1/datasets", params=query, headers=key_a).json()["data"] != []
        assert client.get("/v1/datasets", params=query, headers=key_b).json()["data"] == []
