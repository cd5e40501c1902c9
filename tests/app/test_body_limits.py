"""Bodies are bounded and keys checked before a body is read; bodies that cannot be parsed are
4xx problem+json (issue 7: memory before auth, multipart 500s, the undocumented 400).

The streaming tests drive the app at the ASGI level with a ``receive`` that counts the bytes it
hands over, so "refused without reading the body" is asserted on bytes consumed, not on RSS.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from bitplan.app import crud
from bitplan.app.main import create_app
from bitplan.app.settings import Settings
from bitplan.app.validation import validation_slots
from tests.app._api_fixtures import api_client, assert_problem, job_body

_CHUNK = 64 * 1024
_MIB = 1024 * 1024
_MALFORMED = "tag:bitplan,2025:problem/malformed-body"


@dataclass
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    consumed: int  # request body bytes the app pulled through receive

    def problem(self) -> dict[str, Any]:
        assert self.headers["content-type"].startswith("application/problem+json")
        problem: dict[str, Any] = json.loads(self.body)
        assert problem["status"] == self.status
        return problem


@dataclass
class _Body:
    """A request body handed over chunk by chunk, counting what was taken."""

    chunks: Iterator[bytes]
    consumed: int = 0
    done: bool = False

    async def receive(self) -> dict[str, Any]:
        if self.done:
            return {"type": "http.disconnect"}
        chunk = next(self.chunks, None)
        if chunk is None:
            self.done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        self.consumed += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}


def _call(app: FastAPI, path: str, body: Iterator[bytes], **headers: str) -> _Answer:
    """POST ``body`` to ``path`` over raw ASGI (no Content-Length unless given)."""
    source = _Body(body)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 8000),
    }
    asyncio.run(app(scope, source.receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return _Answer(
        status=start["status"],
        headers={k.decode(): v.decode() for k, v in start["headers"]},
        body=b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"),
        consumed=source.consumed,
    )


def _zeros(total: int) -> Iterator[bytes]:
    chunk = b"0" * _CHUNK
    for _ in range(total // _CHUNK):
        yield chunk


def _multipart_with_a_huge_field(total: int, boundary: str = "b0undary") -> Iterator[bytes]:
    """A multipart body whose non-file field never ends (the upload's own file count misses it)."""
    yield f'--{boundary}\r\nContent-Disposition: form-data; name="other"\r\n\r\n'.encode()
    yield from _zeros(total)


@pytest.fixture
def keyed_app(settings: Settings) -> tuple[FastAPI, str]:
    """An app with keys on and one key's Authorization header value."""
    app = create_app(settings.model_copy(update={"auth": "on"}))
    with app.state.sessionmaker() as session:
        _, plaintext = crud.create_api_key(session, name="a")
    return app, f"Bearer {plaintext}"


# --- authentication before the body -------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/models", "/v1/datasets"])
def test_anonymous_256_mib_body_is_refused_before_a_byte_is_read(
    keyed_app: tuple[FastAPI, str], path: str
) -> None:
    app, _ = keyed_app
    answer = _call(app, path, _zeros(256 * _MIB), content_type="application/json")
    assert answer.status == 401
    assert answer.consumed == 0
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert "API key" in answer.problem()["detail"]


def test_a_body_no_route_reads_is_never_read(keyed_app: tuple[FastAPI, str]) -> None:
    app, _ = keyed_app
    answer = _call(app, "/v1/no-such-route", _zeros(256 * _MIB), content_type="application/json")
    assert (answer.status, answer.consumed) == (404, 0)


@pytest.mark.parametrize("authorization", ["", "Basic eDp5", "Bearer", "Bearer not a token"])
def test_a_malformed_authorization_header_is_401_before_the_body(
    keyed_app: tuple[FastAPI, str], authorization: str
) -> None:
    app, _ = keyed_app
    answer = _call(app, "/v1/jobs", _zeros(_MIB), authorization=authorization)
    assert (answer.status, answer.consumed) == (401, 0)


def test_garbage_json_without_a_key_is_401_not_422(settings: Settings) -> None:
    with api_client(settings.model_copy(update={"auth": "on"})) as client:
        response = client.post(
            "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert_problem(response, 401)
        assert client.get("/v1/health").status_code == 200  # the probe still needs no key


def test_a_well_formed_key_reaches_the_route_which_checks_it(
    keyed_app: tuple[FastAPI, str],
) -> None:
    app, authorization = keyed_app
    with TestClient(app, raise_server_exceptions=False) as client:
        accepted = client.post(
            "/v1/jobs", json=job_body(), headers={"Authorization": authorization}
        )
        assert accepted.status_code == 202, accepted.text
        unknown = client.post("/v1/jobs", json=job_body(), headers={"Authorization": "Bearer x1"})
        assert "unknown or revoked" in assert_problem(unknown, 401)["detail"]


# --- body limits ---------------------------------------------------------------------------------


def test_content_length_over_the_json_limit_is_413_at_once(settings: Settings) -> None:
    app = create_app(settings)
    too_long = str(settings.max_json_bytes + 1)
    answer = _call(app, "/v1/jobs", _zeros(2 * _MIB), content_length=too_long)
    assert (answer.status, answer.consumed) == (413, 0)
    problem = answer.problem()
    assert problem["type"].endswith("/body-too-large")
    assert problem["max_bytes"] == settings.max_json_bytes


def test_content_length_over_the_upload_limit_is_413_at_once(settings: Settings) -> None:
    app = create_app(settings)
    declared = str(settings.max_upload_bytes * 2)
    answer = _call(
        app,
        "/v1/models",
        _zeros(4 * _MIB),
        content_type="multipart/form-data; boundary=b0undary",
        content_length=declared,
    )
    assert (answer.status, answer.consumed) == (413, 0)
    assert answer.problem()["max_bytes"] == settings.max_upload_bytes


def test_a_chunked_json_body_is_stopped_at_the_limit(settings: Settings) -> None:
    app = create_app(settings)
    answer = _call(app, "/v1/jobs", _zeros(256 * _MIB), content_type="application/json")
    assert answer.status == 413
    assert answer.problem()["type"].endswith("/body-too-large")
    assert settings.max_json_bytes < answer.consumed <= settings.max_json_bytes + _CHUNK


def test_a_chunked_upload_is_stopped_at_the_limit_and_leaves_nothing(settings: Settings) -> None:
    app = create_app(settings)
    answer = _call(
        app,
        "/v1/datasets",
        _multipart_with_a_huge_field(256 * _MIB),
        content_type="multipart/form-data; boundary=b0undary",
    )
    assert answer.status == 413
    assert answer.problem()["type"].endswith("/upload-too-large")
    # the limit is the upload limit plus 16 KiB of multipart framing; one chunk may pass it
    assert answer.consumed <= settings.max_upload_bytes + 2 * _CHUNK
    left = (
        [p for p in settings.upload_dir.rglob("*") if p.is_file()]
        if settings.upload_dir.exists()
        else []
    )
    assert left == []


def test_bodies_within_the_limits_pass(settings: Settings) -> None:
    with api_client(settings) as client:
        assert client.post("/v1/jobs", json=job_body()).status_code == 202
        assert client.post("/v1/datasets", files={"file": ("a.txt", b"hello\n")}).status_code == 201


def test_a_model_upload_finding_every_check_busy_is_503_before_a_byte_is_read(
    settings: Settings,
) -> None:
    app = create_app(settings)
    slots = validation_slots(app.state, settings)
    slots.busy = slots.total  # as many model checks running as BITPLAN_MAX_VALIDATIONS allows
    answer = _call(
        app, "/v1/models", _zeros(8 * _MIB), content_type="multipart/form-data; boundary=b0undary"
    )
    assert answer.status == 503 and answer.consumed == 0
    assert answer.headers["retry-after"] == str(settings.validate_retry_after_s)
    assert "BITPLAN_MAX_VALIDATIONS" in answer.problem()["detail"]


# --- bodies that cannot be parsed --------------------------------------------------------------

_B = "b0undary"
_DISPOSITION = 'Content-Disposition: form-data; name="file"; filename="a.txt"'
_END = f"\r\nhi\r\n--{_B}--\r\n"
# Each malformed body, and the words of the 422 that must name its problem.
_MALFORMED_MULTIPART = {
    "cr-in-header": (
        f"--{_B}\r\n{_DISPOSITION}\rX: y\r\n{_END}",
        "a part header line ends with a CR not followed by LF (header lines end with CRLF)",
    ),
    "header-over-4kb": (
        f"--{_B}\r\n{_DISPOSITION}\r\nX-Long: {'a' * 5000}\r\n{_END}",
        "a part header is longer than 4096 bytes",
    ),
    "header-just-over-4kb": (  # under python-multipart's own 4224: only our limit sees it
        f"--{_B}\r\n{_DISPOSITION}\r\nX-Long: {'a' * 4095}\r\n{_END}",
        "a part header is longer than 4096 bytes",
    ),
    "nine-headers": (
        f"--{_B}\r\n{_DISPOSITION}\r\n" + "".join(f"X-H{i}: v\r\n" for i in range(8)) + _END,
        "a part has more than 8 headers",
    ),
    "bytes-before-boundary": (
        f"junk\r\n--{_B}\r\n{_DISPOSITION}\r\n{_END}",
        f"bytes before the first boundary; the body must start with --{_B}",
    ),
    "wrong-boundary": (
        f"--other\r\n{_DISPOSITION}\r\n\r\nhi\r\n--other--\r\n",
        f"the body's first boundary is not the one its Content-Type declares (--{_B})",
    ),
    "no-closing-boundary": (
        f"--{_B}\r\n{_DISPOSITION}\r\n\r\nhi",
        f"the body ended before its closing boundary --{_B}--",
    ),
    "no-part-at-all": (
        "\r\n",
        f"the body holds no part; it must start with the boundary line --{_B}",
    ),
}


@pytest.mark.parametrize(
    ("body", "problem"), _MALFORMED_MULTIPART.values(), ids=_MALFORMED_MULTIPART.keys()
)
def test_malformed_multipart_is_a_422_naming_the_problem(
    settings: Settings, body: str, problem: str
) -> None:
    with api_client(settings) as client:
        response = client.post(
            "/v1/datasets",
            content=body.encode(),
            headers={"content-type": f"multipart/form-data; boundary={_B}"},
        )
        answer = assert_problem(response, 422)
        assert answer["detail"] == f"malformed multipart body: {problem}"
        assert list(settings.upload_dir.rglob("*.part")) == []


def test_a_long_part_header_is_stopped_as_it_streams(settings: Settings) -> None:
    """Sent in small chunks, a header past the limit is refused after at most one chunk more
    (python-multipart's own limit, where it has one, would let 4224 bytes through)."""
    app = create_app(settings)
    head = f"--{_B}\r\n{_DISPOSITION}\r\nX-Long: ".encode()

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(1000):  # 1000 chunks of 64 bytes: far past the limit if never stopped
            yield b"a" * 64

    answer = _call(
        app, "/v1/datasets", chunks(), content_type=f"multipart/form-data; boundary={_B}"
    )
    assert answer.status == 422
    assert "longer than 4096 bytes" in answer.problem()["detail"]
    assert answer.consumed <= len(head) + 4096 + 2 * 64


@pytest.mark.parametrize(
    ("content_type", "problem"),
    [
        ("multipart/form-data", "the Content-Type multipart/form-data has no boundary parameter"),
        (f"multipart/form-data; boundary={'b' * 71}", "the boundary is longer than 70 characters"),
    ],
)
def test_a_bad_boundary_parameter_is_a_422_before_the_body(
    settings: Settings, content_type: str, problem: str
) -> None:
    answer = _call(create_app(settings), "/v1/datasets", _zeros(_MIB), content_type=content_type)
    assert answer.status == 422 and answer.consumed == 0
    assert answer.problem()["detail"].startswith(f"malformed multipart body: {problem}")


def test_json_garbage_is_a_4xx_problem(settings: Settings) -> None:
    with api_client(settings) as client:
        json_type = {"content-type": "application/json"}
        syntax = client.post("/v1/jobs", content=b'{"model": ', headers=json_type)
        assert "JSON decode error" in assert_problem(syntax, 422)["detail"]
        not_utf8 = client.post("/v1/jobs", content=b'{"model": "\xff\xfe"}', headers=json_type)
        problem = assert_problem(not_utf8, 400)
        assert problem["type"] == _MALFORMED
        assert "utf-8" in problem["detail"].lower()
        text = client.post("/v1/jobs", content=b"hello", headers={"content-type": "text/plain"})
        assert_problem(text, 422)


def test_openapi_declares_the_400_and_413_of_every_body(settings: Settings) -> None:
    with api_client(settings) as client:
        paths = client.get("/openapi.json").json()["paths"]
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    for path in ("/v1/jobs", "/v1/models", "/v1/datasets"):
        for code in ("400", "413"):
            declared = paths[path]["post"]["responses"][code]
            assert declared["content"]["application/problem+json"]["schema"] == problem_ref
    assert not {"400", "413"} & set(paths["/v1/jobs"]["get"]["responses"])
