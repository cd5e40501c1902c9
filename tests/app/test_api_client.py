"""The httpx client library against the real app (FastAPI's TestClient as transport)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from bitplan.app.client import ApiError, BitplanClient
from bitplan.app.service_cli import file_sha256
from bitplan.app.settings import Settings
from tests.app._api_fixtures import api_client, finish_job, job_body


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with api_client(settings) as client:
        yield client


def test_client_round_trip(client: TestClient, tmp_path: Path) -> None:
    api = BitplanClient(http=client)
    data_file = tmp_path / "calib.txt"
    data_file.write_text("one sample\nanother sample\n")
    dataset = api.upload_dataset(data_file)
    assert api.upload_dataset(data_file)["id"] == dataset["id"]
    job = api.submit_job(**job_body(calib=dataset["id"]), idempotency_key="k1")
    assert api.submit_job(**job_body(calib=dataset["id"]), idempotency_key="k1")["id"] == job["id"]
    assert [j["id"] for j in api.list_jobs(state="queued")["data"]] == [job["id"]]

    seen: list[dict[str, Any]] = []

    def on_progress(update: dict[str, Any]) -> None:
        seen.append(update)
        if len(seen) == 1:  # a worker would finish the job some time after the first poll
            finish_job(client.app, job["id"])  # type: ignore[arg-type]

    done = api.wait_job(job["id"], poll_s=0.0, progress=on_progress)
    assert done["state"] == "succeeded"
    assert [update["state"] for update in seen] == ["queued", "succeeded"]
    frontier = api.frontier(job["id"])
    plan_id = frontier["points"][0]["plan_id"]
    assert '"bitplan.plan/v1"' in api.plan(job["id"], plan_id)
    assert api.plan(job["id"], plan_id, format="csv").startswith("name,")
    assert api.sensitivity(job["id"]).startswith("layer,")
    report = api.download_report(job["id"], tmp_path / "report.html")
    assert report.read_text().startswith("<html>")


def test_find_upload_asks_the_server_once(client: TestClient, tmp_path: Path) -> None:
    api = BitplanClient(http=client)
    uploaded = []
    for i in range(3):
        data_file = tmp_path / f"calib-{i}.txt"
        data_file.write_text(f"sample {i}\nanother sample\n")
        uploaded.append((api.upload_dataset(data_file), file_sha256(data_file)))
    requests: list[httpx.Request] = []
    client.event_hooks["request"].append(requests.append)
    oldest, oldest_sha = uploaded[0]  # the last one a newest-first listing would reach
    assert api.find_upload("dataset", sha256=oldest_sha) == oldest
    assert len(requests) == 1 and requests[0].url.params["sha256"] == oldest_sha
    assert api.find_upload("model", sha256=oldest_sha) is None  # datasets are not models
    assert api.find_upload("dataset", sha256="0" * 64) is None


def test_client_raises_problems_and_times_out(client: TestClient) -> None:
    api = BitplanClient(http=client)
    with pytest.raises(ApiError) as caught:
        api.get_job("missing")
    assert caught.value.status == 404 and caught.value.problem["status"] == 404
    job = api.submit_job(**job_body())
    with pytest.raises(TimeoutError):
        api.wait_job(job["id"], poll_s=0.0, timeout=0.0)
    assert api.cancel_job(job["id"])["state"] == "cancelled"
    with pytest.raises(ApiError) as caught:
        api.frontier(job["id"])
    assert caught.value.status == 409


def test_a_download_broken_mid_transfer_leaves_no_file_behind(tmp_path: Path) -> None:
    class Broken(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield b"half a model"
            raise httpx.ReadError("connection reset")

    def answer(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Disposition": 'attachment; filename="model.gguf"'}
        return httpx.Response(200, headers=headers, stream=Broken())

    http = httpx.Client(transport=httpx.MockTransport(answer), base_url="http://bitplan")
    dest = tmp_path / "out"
    with pytest.raises(httpx.ReadError):
        BitplanClient(http=http).download_model("job", "p1", dest, to="gguf")
    assert list(dest.iterdir()) == []
