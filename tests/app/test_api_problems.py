"""Every error is RFC 9457 problem+json, and the OpenAPI document declares every status code."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from bitplan.app.main import create_app
from bitplan.app.settings import Settings
from tests.app._api_fixtures import api_client, assert_problem


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with api_client(settings) as client:
        yield client


def test_unknown_route_and_resource_are_404_problems(client: TestClient) -> None:
    assert_problem(client.get("/v1/nothing-here"), 404)
    body = assert_problem(client.get("/v1/jobs/0000"), 404)
    assert "0000" in body["detail"]
    assert_problem(client.get("/v1/models/0000"), 404)
    assert_problem(client.delete("/v1/datasets/0000"), 404)


def test_wrong_method_is_a_405_problem(client: TestClient) -> None:
    assert_problem(client.put("/v1/jobs"), 405)


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        # two routes serve each of these paths: Allow names the methods of both
        ("PUT", "/v1/jobs", "GET, POST"),
        ("OPTIONS", "/v1/models", "GET, POST"),
        ("PATCH", "/v1/datasets/some-id", "GET, DELETE"),
        # ":cancel" is no part of a job id: this path is the cancel route's alone
        ("GET", "/v1/jobs/some-id:cancel", "POST"),
        ("DELETE", "/openapi.json", "GET, HEAD"),
    ],
)
def test_405_allow_lists_every_method_of_the_path(
    client: TestClient, method: str, path: str, allow: str
) -> None:
    response = client.request(method, path)
    assert_problem(response, 405)
    assert response.headers["allow"] == allow


def test_validation_errors_list_each_field(client: TestClient) -> None:
    body = assert_problem(client.post("/v1/jobs", json={"model": "builtin:digits-cnn"}), 422)
    assert body["type"].endswith("validation")
    assert [error["loc"] for error in body["errors"]] == ["body.budget"]
    body = assert_problem(
        client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}),
        422,
    )
    assert body["errors"]


def test_unhandled_errors_are_500_problems_without_internals(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    with TestClient(app, raise_server_exceptions=False) as client:
        body = assert_problem(client.get("/boom"), 500)
    assert "secret" not in body["detail"]


def test_health_reports_ok(client: TestClient) -> None:
    response = client.get("/v1/health")
    # alive (200) while the database answers; no worker runs here, hence "degraded"
    assert response.status_code == 200 and response.json()["status"] == "degraded"


def _declared(schema: dict, path: str, method: str) -> set[str]:
    return set(schema["paths"][path][method]["responses"])


def test_openapi_declares_status_codes_and_problem_bodies(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    expected = {
        ("/v1/jobs", "post"): {"202", "400", "401", "413", "422", "500"},
        ("/v1/jobs", "get"): {"200", "401", "422", "500"},
        # 405: an id ending in ":cancel" names the cancel action, which takes POST only
        ("/v1/jobs/{job_id}", "get"): {"200", "304", "401", "404", "405", "422", "500"},
        ("/v1/jobs/{job_id}:cancel", "post"): {"202", "401", "404", "409", "422", "500"},
        ("/v1/jobs/{job_id}/frontier", "get"): {"200", "401", "404", "409", "422", "500"},
        ("/v1/jobs/{job_id}/plans/{plan_id}", "get"): {"200", "401", "404", "409", "422", "500"},
        ("/v1/jobs/{job_id}/sensitivity", "get"): {"200", "401", "404", "409", "422", "500"},
        ("/v1/jobs/{job_id}/report", "get"): {"200", "401", "404", "409", "422", "500"},
        ("/v1/models", "post"): {"200", "201", "400", "401", "413", "415", "422", "500"},
        ("/v1/models", "get"): {"200", "401", "422", "500"},
        ("/v1/models/{blob_id}", "get"): {"200", "401", "404", "422", "500"},
        ("/v1/models/{blob_id}", "delete"): {"204", "401", "404", "409", "422", "500"},
        ("/v1/datasets", "post"): {"200", "201", "400", "401", "413", "415", "422", "500"},
        ("/v1/health", "get"): {"200", "422", "500", "503"},
    }
    for (path, method), codes in expected.items():
        # 503 (a busy database, with Retry-After) can happen on every route
        assert _declared(schema, path, method) == codes | {"503"}, (path, method)
        for code in codes - {"200", "201", "202", "204", "304"}:
            content = schema["paths"][path][method]["responses"][code]["content"]
            assert list(content) == ["application/problem+json"], (path, method, code)
    assert "Problem" in schema["components"]["schemas"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    upload = schema["paths"]["/v1/models"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in upload
