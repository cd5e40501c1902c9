"""HTTP tests of /v1/jobs: submit, ETag/304, pagination, idempotency, cancel, results."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from bitplan.app.schemas import BUDGET_PATTERN, FORMAT_PATTERN, JobCreate
from bitplan.app.settings import Settings
from bitplan.search.budgets import parse_budget
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.format_spec import parse_format
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
    unknown = "0f0f0f0f-0000-4000-8000-000000000000"  # an id's shape, but no upload's id
    for field, route in (("model", "POST /v1/models"), ("calib", "POST /v1/datasets")):
        body = assert_problem(client.post("/v1/jobs", json=job_body(**{field: unknown})), 422)
        assert body["type"].endswith("unknown-resource") and route in body["detail"]
        # not even an id's shape: refused by the schema (anyOf a builtin or an id pattern)
        body = assert_problem(client.post("/v1/jobs", json=job_body(**{field: "nope"})), 422)
        assert body["type"].endswith("validation") and route in body["detail"]
        assert [error["loc"] for error in body["errors"]] == [f"body.{field}"]


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


def test_empty_cursor_is_the_first_page(client: TestClient) -> None:
    job_id = client.post("/v1/jobs", json=job_body()).json()["id"]
    page = client.get("/v1/jobs?cursor=")
    assert page.status_code == 200, page.text
    assert [job["id"] for job in page.json()["data"]] == [job_id]


def test_cursor_outside_base64url_is_refused_by_its_schema(client: TestClient) -> None:
    body = assert_problem(client.get("/v1/jobs", params={"cursor": "a+b/c"}), 422)
    assert body["type"].endswith("validation")
    assert [error["loc"] for error in body["errors"]] == ["query.cursor"]
    assert_problem(client.get("/v1/models", params={"cursor": "x" * 513}), 422)


@pytest.mark.parametrize(
    ("override", "field"),
    [({"seed": False}, "seed"), ({"trials": "40"}, "trials"), ({"holdout": "0.5"}, "holdout")],
)
def test_job_numbers_must_be_json_numbers(
    client: TestClient, override: dict[str, object], field: str
) -> None:
    body = assert_problem(client.post("/v1/jobs", json=job_body(**override)), 422)
    assert [error["loc"] for error in body["errors"]] == [f"body.{field}"]


def test_integral_floats_are_integers(client: TestClient) -> None:
    # JSON Schema counts 40.0 as an integer, so the API must take it for an integer field.
    response = client.post("/v1/jobs", json=job_body(trials=40.0, seed=7.0))
    assert response.status_code == 202, response.text
    assert (response.json()["request"]["trials"], response.json()["request"]["seed"]) == (40, 7)


def test_openapi_states_the_budget_and_format_syntax(client: TestClient) -> None:
    job = client.get("/openapi.json").json()["components"]["schemas"]["JobCreate"]["properties"]
    assert job["budget"]["pattern"] == BUDGET_PATTERN
    assert job["formats"]["items"]["pattern"] == FORMAT_PATTERN
    assert job["formats"]["uniqueItems"] is True
    assert job["pins"]["additionalProperties"]["pattern"] == FORMAT_PATTERN
    assert_problem(client.post("/v1/jobs", json=job_body(formats=["int8", "int8"])), 422)


def _accepted(budget: str) -> bool:
    try:
        JobCreate(model="builtin:digits-cnn", budget=budget)
    except ValidationError:
        return False
    return True


# Near misses as well as random text: numbers, spaces and unit-like letters in any order.
_BUDGET_LIKE = st.from_regex(r"\A[0-9. ]{0,6}[bBpPwWxXkKmMgGtTiI]{1,4} ?\Z") | st.text(max_size=8)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.from_regex(BUDGET_PATTERN, fullmatch=True).filter(lambda text: len(text) <= 64))
def test_every_budget_the_pattern_allows_is_accepted(budget: str) -> None:
    assert _accepted(budget), budget
    parse_budget(budget)  # the library's parser reads it too


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(_BUDGET_LIKE)
def test_a_budget_is_accepted_exactly_when_the_pattern_matches(budget: str) -> None:
    assert _accepted(budget) == (re.fullmatch(BUDGET_PATTERN, budget) is not None), budget


@pytest.mark.parametrize(
    ("budget", "accepted"),
    [
        ("4.5bpw", True),
        ("32bpw", True),
        ("32.0bpw", True),
        ("60MB", True),
        ("58 MiB", True),
        ("0.3x", True),
        (".001kB", True),
        ("1B", True),
        ("0bpw", False),  # zero
        ("32.5bpw", False),  # more than fp32
        ("0.5B", False),  # under one byte
        ("0.0005MB", False),  # 500 bytes, but finer than the API's 0.001 of a unit
        (" 4bpw", False),  # spaces around it
    ],
)
def test_budget_syntax_examples(budget: str, accepted: bool) -> None:
    assert _accepted(budget) is accepted


_FORMAT_LIKE = st.from_regex(
    r"\A(int|fp|bf|q|fp8-e)[0-9]{0,2}(-g[0-9]{1,4})?(-asym|_k|_0|_1|m3)?\Z"
) | st.sampled_from(["fp32", "bf16", "fp16", "fp8-e4m3", "int8", "q4_k", "q8_0"])


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(_FORMAT_LIKE)
def test_a_format_name_matches_the_pattern_exactly_when_it_parses(name: str) -> None:
    try:
        parsed = parse_format(name)
    except InputError:
        parsed = None
    matches = re.fullmatch(FORMAT_PATTERN, name) is not None
    assert matches == (parsed is not None and parsed.name == name), name
