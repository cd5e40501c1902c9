"""Health and readiness report live workers and the queue; readiness is 503 without workers."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session

from bitplan.app.db import make_engine
from bitplan.app.models import Job, utcnow
from bitplan.app.settings import Settings
from bitplan.app.worker_presence import forget_worker, record_beat
from tests.app._api_fixtures import api_client, assert_problem


def _enqueue(settings: Settings, *, waited_s: float) -> None:
    engine = make_engine(settings.database_url)
    try:
        with Session(engine) as session:
            session.add(Job(spec={}, created_at=utcnow() - timedelta(seconds=waited_s)))
            session.commit()
    finally:
        engine.dispose()


def _beat(settings: Settings, worker_id: str, *, ago_s: float = 0.0) -> None:
    engine = make_engine(settings.database_url)
    try:
        record_beat(engine, worker_id, now=utcnow() - timedelta(seconds=ago_s))
    finally:
        engine.dispose()


def test_without_workers_health_is_degraded_and_ready_is_503(settings: Settings) -> None:
    _enqueue(settings, waited_s=120)
    _enqueue(settings, waited_s=5)
    with api_client(settings) as client:
        health = client.get("/v1/health")
        ready = client.get("/v1/health/ready")
    assert health.status_code == 200
    assert health.json()["status"] == "degraded"
    assert health.json()["workers_alive"] == 0
    assert health.json()["queue_depth"] == 2
    assert health.json()["oldest_queued_age_s"] >= 120
    body = assert_problem(ready, 503)
    assert body["type"].endswith("/no-workers")
    assert int(ready.headers["Retry-After"]) >= 1
    assert body["workers_alive"] == 0 and body["queue_depth"] == 2


def test_a_fresh_beat_makes_the_service_ready(settings: Settings) -> None:
    _beat(settings, "host-a:1")
    _beat(settings, "host-b:2")
    with api_client(settings) as client:
        ready = client.get("/v1/health/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ok"
    assert ready.json()["workers_alive"] == 2
    assert ready.json()["queue_depth"] == 0
    assert ready.json()["oldest_queued_age_s"] is None


def test_a_worker_silent_for_a_lease_no_longer_counts(settings: Settings) -> None:
    _beat(settings, "alive:1")
    _beat(settings, "killed:2", ago_s=settings.lease_seconds + 1)
    with api_client(settings) as client:
        assert client.get("/v1/health").json()["workers_alive"] == 1
    engine = make_engine(settings.database_url)
    try:
        forget_worker(engine, "alive:1")  # what a worker does when it stops
    finally:
        engine.dispose()
    with api_client(settings) as client:
        assert_problem(client.get("/v1/health/ready"), 503)


def test_ready_needs_no_key_and_is_documented(settings: Settings) -> None:
    _beat(settings, "w:1")
    with api_client(settings.model_copy(update={"auth": "on"})) as client:
        assert client.get("/v1/health/ready").status_code == 200
        schema = client.get("/openapi.json").json()
    responses = schema["paths"]["/v1/health/ready"]["get"]["responses"]
    assert {"200", "503"} <= set(responses)
    assert list(responses["503"]["content"]) == ["application/problem+json"]
