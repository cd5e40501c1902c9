"""API keys: 401 without a valid key, per-key isolation (404 for another key's resources), and
keys required whenever the server listens beyond loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from bitplan.app import crud
from bitplan.app.main import create_app
from bitplan.app.models import utcnow
from bitplan.app.settings import Settings
from bitplan.sensitivity.errors import InputError
from tests.app._api_fixtures import api_client, assert_problem, job_body


@pytest.fixture
def keyed(settings: Settings) -> Iterator[tuple[TestClient, dict[str, str], dict[str, str]]]:
    """A client on an app with keys on, and the Authorization headers of keys A and B."""
    with api_client(settings.model_copy(update={"auth": "on"})) as client:
        with client.app.state.sessionmaker() as session:  # type: ignore[attr-defined]
            _, key_a = crud.create_api_key(session, name="a")
            _, key_b = crud.create_api_key(session, name="b")
        yield client, {"Authorization": f"Bearer {key_a}"}, {"Authorization": f"Bearer {key_b}"}


def test_missing_or_bad_key_is_401_with_a_challenge(keyed) -> None:  # noqa: ANN001
    client, _, _ = keyed
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic eDp5"}):
        response = client.get("/v1/jobs", headers=headers)
        assert_problem(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert_problem(client.post("/v1/datasets", files={"file": ("a.txt", b"x\n")}), 401)
    assert client.get("/v1/health").status_code == 200  # probes need no key


def test_revoked_key_is_401(keyed) -> None:  # noqa: ANN001
    client, key_a, _ = keyed
    assert client.get("/v1/jobs", headers=key_a).status_code == 200
    with client.app.state.sessionmaker() as session:
        row = crud.find_api_key(session, plaintext=key_a["Authorization"].split()[1])
        row.revoked_at = utcnow()
        session.commit()
    assert_problem(client.get("/v1/jobs", headers=key_a), 401)


def test_resources_of_one_key_are_404_for_another(keyed) -> None:  # noqa: ANN001
    client, key_a, key_b = keyed
    dataset = client.post("/v1/datasets", files={"file": ("a.txt", b"hello\n")}, headers=key_a)
    assert dataset.status_code == 201
    dataset_id = dataset.json()["id"]
    job = client.post("/v1/jobs", json=job_body(calib=dataset_id), headers=key_a).json()
    assert_problem(client.get(f"/v1/jobs/{job['id']}", headers=key_b), 404)
    assert_problem(client.post(f"/v1/jobs/{job['id']}:cancel", headers=key_b), 404)
    assert_problem(client.get(f"/v1/jobs/{job['id']}/frontier", headers=key_b), 404)
    assert_problem(client.get(f"/v1/datasets/{dataset_id}", headers=key_b), 404)
    assert_problem(client.delete(f"/v1/datasets/{dataset_id}", headers=key_b), 404)
    # B cannot use A's dataset in a job, and sees none of A's things in lists
    assert_problem(client.post("/v1/jobs", json=job_body(calib=dataset_id), headers=key_b), 422)
    assert client.get("/v1/jobs", headers=key_b).json()["data"] == []
    assert client.get("/v1/datasets", headers=key_b).json()["data"] == []
    # the same bytes uploaded by B are B's own resource
    mine = client.post("/v1/datasets", files={"file": ("a.txt", b"hello\n")}, headers=key_b)
    assert mine.status_code == 201 and mine.json()["id"] != dataset_id
    # idempotency keys are scoped per API key too
    headers_a, headers_b = key_a | {"Idempotency-Key": "k"}, key_b | {"Idempotency-Key": "k"}
    job_a = client.post("/v1/jobs", json=job_body(), headers=headers_a).json()
    job_b = client.post("/v1/jobs", json=job_body(), headers=headers_b).json()
    assert job_a["id"] != job_b["id"]
    assert client.get(f"/v1/jobs/{job['id']}", headers=key_a).status_code == 200


@pytest.mark.parametrize(
    ("auth", "host", "required"),
    [
        ("auto", "127.0.0.1", False),
        ("auto", "::1", False),
        ("auto", "0.0.0.0", True),
        ("auto", "example.org", True),
        ("on", "127.0.0.1", True),
        ("off", "localhost", False),
    ],
)
def test_auth_mode_follows_the_listening_host(
    settings: Settings, auth: str, host: str, required: bool
) -> None:
    with api_client(settings.model_copy(update={"auth": auth, "host": host})) as client:
        status = client.get("/v1/jobs").status_code
    assert status == (401 if required else 200)


def test_auth_off_beyond_loopback_is_refused(settings: Settings) -> None:
    with pytest.raises(InputError, match="loopback"):
        create_app(settings.model_copy(update={"auth": "off", "host": "0.0.0.0"}))
