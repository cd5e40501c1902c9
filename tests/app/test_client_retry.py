"""BitplanClient asks again after 429/503, as long as the server's ``Retry-After`` says (bounded),
with the same ``Idempotency-Key``, and re-sends an upload from its first byte."""

from __future__ import annotations

import email.utils
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from bitplan.app.client import DEFAULT_RETRIES, ApiError, BitplanClient, retry_after_s

Handler = Callable[[httpx.Request], httpx.Response]


def _busy(status: int = 503, retry_after: str | None = "3") -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    problem = {"type": "about:blank", "title": "busy", "status": status, "detail": "busy"}
    return httpx.Response(status, json=problem, headers=headers)


def _scripted(answers: list[httpx.Response], seen: list[httpx.Request]) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return answers.pop(0)

    return handle


def _client(handler: Handler, waits: list[float], **kwargs: int) -> BitplanClient:
    http = httpx.Client(base_url="http://bitplan.test", transport=httpx.MockTransport(handler))
    return BitplanClient(http=http, sleep=waits.append, **kwargs)


@pytest.mark.parametrize("status", [429, 503])
def test_submit_retries_after_retry_after_with_the_same_idempotency_key(status: int) -> None:
    seen: list[httpx.Request] = []
    waits: list[float] = []
    accepted = httpx.Response(202, json={"id": "job-1", "state": "queued"})
    client = _client(_scripted([_busy(status, "3"), _busy(status, "1"), accepted], seen), waits)
    assert client.submit_job(model="builtin:digits-cnn", budget="4bpw")["id"] == "job-1"
    assert waits == [3.0, 1.0]
    keys = {request.headers["Idempotency-Key"] for request in seen}
    assert len(seen) == 3 and len(keys) == 1  # a retry can never queue a second job


def test_retries_are_bounded_and_end_in_the_servers_problem() -> None:
    seen: list[httpx.Request] = []
    waits: list[float] = []
    client = _client(_scripted([_busy() for _ in range(10)], seen), waits, retries=2)
    with pytest.raises(ApiError) as raised:
        client.get_job("job-1")
    assert raised.value.status == 503 and raised.value.problem["detail"] == "busy"
    assert len(seen) == 3 and waits == [3.0, 3.0]


def test_other_errors_are_not_retried() -> None:
    seen: list[httpx.Request] = []
    waits: list[float] = []
    client = _client(_scripted([httpx.Response(500, json={"status": 500})], seen), waits)
    with pytest.raises(ApiError):
        client.get_job("job-1")
    assert len(seen) == 1 and waits == []


def test_an_upload_is_sent_whole_again_on_retry(tmp_path: Path) -> None:
    path = tmp_path / "calib.txt"
    path.write_bytes(b"a sentence\n" * 100)
    seen: list[httpx.Request] = []
    waits: list[float] = []
    stored = httpx.Response(201, json={"id": "ds-1"})
    client = _client(_scripted([_busy(429, "2"), stored], seen), waits)
    assert client.upload_dataset(path)["id"] == "ds-1"
    assert len(seen) == 2
    assert all(path.read_bytes() in request.content for request in seen)


def test_retry_after_forms() -> None:
    def wait(value: str | None, retry: int = 0) -> float:
        return retry_after_s(_busy(retry_after=value), retry=retry)

    assert wait("7") == 7.0
    assert wait("100000") == wait(None, retry=30)  # capped
    assert wait(None) == 1.0 and wait(None, retry=2) == 4.0  # exponential without a header
    assert wait("soon", retry=1) == 2.0  # unreadable: the fallback
    later = datetime.now(UTC) + timedelta(seconds=5)
    assert 3.0 <= wait(email.utils.format_datetime(later, usegmt=True)) <= 5.0
    past = datetime.now(UTC) - timedelta(seconds=5)
    assert wait(email.utils.format_datetime(past, usegmt=True)) == 0.0
    assert DEFAULT_RETRIES >= 1
    with pytest.raises(ValueError, match="retries"):
        BitplanClient(retries=-1)
