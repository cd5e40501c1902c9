"""HTTP tests of /v1/jobs: submit, ETag/304, pagination, idempotency, cancel, results."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from bitplan.app.settings import Settings
from tests.app._api_fixtures import api_client, assert_problem, finish_job, job_body


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with api_client(settings) as client:
        yield client


def test_submit_builtin_job_is_queued_with_location(client: TestClient) -> None:
    response = client.post("/v1/jobs", json=job_body(formats=["int8", "int4-g32"]))
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] == "queued" and job["plans"] == []
    assert (job["progress"], job["eta_s"], job["stage_progress"], job["stage_eta_s"]) == (
        0.0,
        None,
        0.0,
        None,
    )
    assert job["request"]["model"] == "builtin:digits-cnn"
    assert job["request"]["calib"] == "builtin"
    assert job["request"]["formats"] == ["int8", "int4-g32"]
    assert job["links"]["cancel"] == f"/v1/jobs/{job['id']}:cancel"
    fetched = client.get(job["links"]["self"])
    assert fetched.status_code == 200 and fetched.json()["id"] == job["id"]


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"budget": "lots"}, "budget"),
        ({"formats": ["int7"]}, "formats"),
        ({"method": "magic"}, "method"),
        ({"pins": {"fc": "int9"}}, "pins"),
        ({"trials": -1}, "trials"),
        ({"colour": "blue"}, "colour"),
        ({"model": "builtin:no-such-model"}, "model"),
    ],
)
def test_invalid_job_fields_are_422_problems_naming_the_field(
    client: TestClient, override: dict[str, object], field: str
) -> None:
    body = assert_problem(client.post("/v1/jobs", json=job_body(**override)), 422)
    assert any(field in error["loc"] for error in body["errors"])
    assert field in body["detail"]


def test_unknown_uploaded_model_or_dataset_is_422(client: TestClient) -> None:
    body = assert_problem(client.post("/v1/jobs", json=job_body(model="nope")), 422)
    assert "POST /v1/models" in body["detail"]
    body = assert_problem(client.post("/v1/jobs", json=job_body(calib="nope")), 422)
    assert "POST /v1/datasets" in body["detail"]


def test_etag_gives_304_until_the_job_changes(client: TestClient) -> None:
    job_id = client.post("/v1/jobs", json=job_body()).json()["id"]
    first = client.get(f"/v1/jobs/{job_id}")
    etag = first.headers["etag"]
    unchanged = client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag})
    assert unchanged.status_code == 304 and unchanged.content == b""
    assert unchanged.headers["etag"] == etag
    weak = client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": f'"x", W/{etag}'})
    assert weak.status_code == 304
    client.post(f"/v1/jobs/{job_id}:cancel")
    changed = client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert changed.json()["state"] == "cancelled"


def test_list_pages_by_cursor_newest_first_without_overlap(client: TestClient) -> None:
    created = [client.post("/v1/jobs", json=job_body(seed=seed)).json()["id"] for seed in range(5)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/jobs", params=params).json()
        assert len(page["data"]) <= 2
        seen += [job["id"] for job in page["data"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == created[::-1]


def test_list_filters_by_state_and_rejects_bad_input(client: TestClient) -> None:
    ids = [client.post("/v1/jobs", json=job_body(seed=seed)).json()["id"] for seed in range(3)]
    client.post(f"/v1/jobs/{ids[1]}:cancel")
    cancelled = client.get("/v1/jobs", params={"state": "cancelled"}).json()["data"]
    assert [job["id"] for job in cancelled] == [ids[1]]
    assert_problem(client.get("/v1/jobs", params={"state": "sleeping"}), 422)
    assert_problem(client.get("/v1/jobs", params={"limit": 0}), 422)
    assert_problem(client.get("/v1/jobs", params={"cursor": "not-a-cursor"}), 422)


def test_idempotency_key_replays_same_body_and_refuses_another(client: TestClient) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = client.post("/v1/jobs", json=job_body(), headers=headers)
    again = client.post("/v1/jobs", json=job_body(), headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert len(client.get("/v1/jobs").json()["data"]) == 1
    conflict = client.post("/v1/jobs", json=job_body(budget="3bpw"), headers=headers)
    body = assert_problem(conflict, 422)
    assert body["type"].endswith("idempotency-key-reused")
    other_key = client.post("/v1/jobs", json=job_body(), headers={"Idempotency-Key": "order-43"})
    assert other_key.json()["id"] != first.json()["id"]


def test_cancel_queued_job_and_refuse_cancel_of_finished_job(client: TestClient) -> None:
    job_id = client.post("/v1/jobs", json=job_body()).json()["id"]
    cancelled = client.post(f"/v1/jobs/{job_id}:cancel")
    assert cancelled.status_code == 202
    assert cancelled.json()["state"] == "cancelled" and cancelled.json()["cancel_requested"]
    done_id = client.post("/v1/jobs", json=job_body(seed=1)).json()["id"]
    finish_job(client.app, done_id)  # type: ignore[arg-type]
    body = assert_problem(client.post(f"/v1/jobs/{done_id}:cancel"), 409)
    assert body["state"] == "succeeded"
    assert_problem(client.post("/v1/jobs/missing:cancel"), 404)


@pytest.mark.parametrize("suffix", ["frontier", "plans/{plan_id}", "sensitivity", "report"])
def test_results_are_409_until_the_job_succeeded(client: TestClient, suffix: str) -> None:
    job_id = client.post("/v1/jobs", json=job_body()).json()["id"]
    early = client.get(f"/v1/jobs/{job_id}/{suffix.format(plan_id='any-plan')}")
    body = assert_problem(early, 409)
    assert body["state"] == "queued" and body["type"].endswith("not-ready")
    (plan_id,) = finish_job(client.app, job_id)  # type: ignore[arg-type]
    assert client.get(f"/v1/jobs/{job_id}/{suffix.format(plan_id=plan_id)}").status_code == 200


def test_report_is_409_until_its_file_exists(client: TestClient) -> None:
    job_id = client.post("/v1/jobs", json=job_body()).json()["id"]
    finish_job(client.app, job_id, report=False)  # type: ignore[arg-type]
    assert_problem(client.get(f"/v1/jobs/{job_id}/report"), 409)
    assert client.get(f"/v1/jobs/{job_id}/frontier").status_code == 200


def test_succeeded_job_serves_frontier_plans_and_sensitivity(client: TestClient) -> None:
    job_id = client.post("/v1/jobs", json=job_body()).json()["id"]
    plan_ids = finish_job(client.app, job_id, n_plans=2)  # type: ignore[arg-type]
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded" and job["plans"] == plan_ids
    frontier = client.get(f"/v1/jobs/{job_id}/frontier").json()
    assert frontier["schema"] == "bitplan.frontier/v1"
    assert [p["href"] for p in frontier["points"]] == [
        f"/v1/jobs/{job_id}/plans/{plan_id}" for plan_id in plan_ids
    ]
    assert frontier["points"][0]["metrics"]["holdout"] == {"accuracy": 0.9}
    plans = [client.get(point["href"]) for point in frontier["points"]]
    assert all(plan.headers["content-type"].startswith("application/json") for plan in plans)
    formats = [json.loads(plan.content)["layers"][0]["format"] for plan in plans]
    assert formats == ["int4-g32", "int8"]  # smallest first
    href = frontier["points"][0]["href"]
    as_csv = client.get(href, params={"format": "csv"})
    assert as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [row["format"] for row in rows] == ["int4-g32"]
    # each export names the layer its own way: the module FQN, the GGUF tensor name
    for fmt, name in (("torchao", "h.0.mlp.c_fc"), ("llamacpp", "ffn_up")):
        exported = client.get(href, params={"format": fmt})
        assert exported.status_code == 200 and name in exported.text
    assert_problem(client.get(href, params={"format": "gguf"}), 422)
    assert_problem(client.get(f"/v1/jobs/{job_id}/plans/p999"), 404)
    assert_problem(client.get(f"/v1/jobs/{job_id}/plans/..%2Fsecret"), 404)
    sensitivity = client.get(f"/v1/jobs/{job_id}/sensitivity")
    assert sensitivity.headers["content-type"].startswith("text/csv")
    assert sensitivity.text.startswith("layer,")
    report = client.get(f"/v1/jobs/{job_id}/report")
    assert report.headers["content-type"].startswith("text/html")
