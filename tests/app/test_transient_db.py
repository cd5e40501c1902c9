"""Transient database errors are backpressure, not failures.

- The worker survives "database is locked" / pool timeouts injected into its claim, reap,
  progress and final writes: it backs off (logged), tries again, and the job succeeds once.
- The API answers such errors with 503 problem+json and ``Retry-After`` instead of a 500, and a
  request that finds every database slot taken waits, then gets the same 503.
- The backoff grows, is capped and jittered; only database errors that pass are retried.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from bitplan.app import crud, queue, worker
from bitplan.app.db import Backoff, is_transient, make_engine, make_sessionmaker, retry_transient
from bitplan.app.settings import Settings
from bitplan.search.spec import JobSpec
from tests.app._api_fixtures import api_client, assert_problem, enqueue_job, job_body

LOCKED = sa_exc.OperationalError("BEGIN IMMEDIATE", {}, sqlite3.OperationalError("locked"))
POOL_FULL = sa_exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached")
WAIT_S = 30.0  # bound on a request the test holds open: far beyond any plausible slowness


def quick_runner(spec: JobSpec, *, out_dir: Path, progress: Any, **_: Any) -> None:
    """Stands in for run_job: one progress report and a plans folder."""
    progress("search", 1, 1)
    (out_dir / "plans").mkdir()


def _failing_first(
    monkeypatch: pytest.MonkeyPatch, name: str, times: int, error: Exception
) -> list[int]:
    """Make ``worker.<name>`` raise ``error`` on its first ``times`` calls; returns call counts."""
    real: Callable[..., Any] = getattr(worker, name)
    calls = [0]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] <= times:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(worker, name, flaky)
    return calls


@pytest.fixture
def engine_sqlite(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.database_url)
    yield engine
    engine.dispose()


def _enqueue(engine: Engine) -> str:
    return enqueue_job(engine, max_attempts=1)


def test_worker_survives_transient_errors_and_runs_the_job_once(
    settings: Settings,
    engine_sqlite: Engine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(worker, "_BACKOFF", Backoff(base_s=0.001, cap_s=0.01))
    job_id = _enqueue(engine_sqlite)
    reaps = _failing_first(monkeypatch, "reap_expired", 2, LOCKED)
    claims = _failing_first(monkeypatch, "claim_job", 3, POOL_FULL)
    progress = _failing_first(monkeypatch, "set_progress", 1, LOCKED)
    finishes = _failing_first(monkeypatch, "finish_job", 2, LOCKED)
    with caplog.at_level(logging.WARNING):
        ran = worker.run_worker(settings, once=True, runner=quick_runner)
    assert ran == 1
    assert reaps[0] >= 3 and claims[0] >= 4 and progress[0] == 1 and finishes[0] == 3
    with make_sessionmaker(engine_sqlite)() as session:
        job = crud.get_job(session, job_id=job_id, owner_id=None)
    assert job is not None and (job.state, job.attempts) == ("succeeded", 1)
    assert (settings.artifact_dir / job_id / "plans").is_dir()
    retries = [r.getMessage() for r in caplog.records if "database unavailable" in r.getMessage()]
    assert len(retries) == 2 + 3  # every failed reap and claim is logged with its wait
    assert any("progress not recorded" in r.getMessage() for r in caplog.records)
    assert any("recording the outcome" in r.getMessage() for r in caplog.records)


def test_failed_heartbeats_are_retried_without_losing_the_job(
    settings: Settings,
    engine_sqlite: Engine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(worker, "_BACKOFF", Backoff(base_s=0.001, cap_s=0.01))
    job_id = _enqueue(engine_sqlite)
    beats = _failing_first(monkeypatch, "heartbeat", 2, LOCKED)
    now = [0.0]  # the worker's clock, advanced by the runner: beats come due without sleeping

    def beating_runner(spec: JobSpec, *, out_dir: Path, **_: Any) -> None:
        for _step in range(int(WAIT_S / 0.01)):
            if beats[0] >= 3:  # two failed beats, then one that renewed the lease
                break
            now[0] += settings.heartbeat_seconds
            time.sleep(0.01)
        (out_dir / "plans").mkdir()

    with caplog.at_level(logging.WARNING):
        assert (
            worker.run_worker(settings, once=True, runner=beating_runner, clock=lambda: now[0]) == 1
        )
    assert beats[0] >= 3
    assert sum("heartbeat failed" in r.getMessage() for r in caplog.records) == 2
    with make_sessionmaker(engine_sqlite)() as session:
        job = crud.get_job(session, job_id=job_id, owner_id=None)
    assert job is not None and (job.state, job.attempts) == ("succeeded", 1)


def test_worker_still_stops_on_errors_that_are_not_transient(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_first(monkeypatch, "claim_job", 1, RuntimeError("a bug, not the database"))
    with pytest.raises(RuntimeError, match="a bug"):
        worker.run_worker(settings, once=True, runner=quick_runner)


def test_an_outcome_the_database_never_takes_is_left_to_the_lease(
    settings: Settings,
    engine_sqlite: Engine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(worker, "_BACKOFF", Backoff(base_s=0.001, cap_s=0.01))
    job_id = _enqueue(engine_sqlite)
    finishes = _failing_first(monkeypatch, "finish_job", 1000, LOCKED)
    with caplog.at_level(logging.ERROR):
        assert worker.run_worker(settings, once=True, runner=quick_runner) == 1
    assert finishes[0] == worker._SETTLE_ATTEMPTS
    assert any("lease will expire" in r.getMessage() for r in caplog.records)
    with make_sessionmaker(engine_sqlite)() as session:
        job = crud.get_job(session, job_id=job_id, owner_id=None)
    assert job is not None and job.state == "running"  # the reaper takes it from here
    after_lease = job.lease_expires_at + timedelta(milliseconds=1)
    assert queue.reap_expired(engine_sqlite, now=after_lease) == 1


@pytest.mark.parametrize("error", [LOCKED, POOL_FULL], ids=["locked", "pool-timeout"])
def test_api_answers_a_busy_database_with_503_and_retry_after(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def busy(*_: Any, **__: Any) -> Any:
        raise error

    monkeypatch.setattr(crud, "create_job", busy)
    with api_client(settings) as client:
        answer = client.post("/v1/jobs", json=job_body())
    body = assert_problem(answer, 503)
    assert answer.headers["Retry-After"] == str(settings.busy_retry_after_s)
    assert body["type"].endswith("/busy")


def test_api_still_answers_500_for_a_database_error_that_is_not_transient(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any, **__: Any) -> Any:
        raise sa_exc.ProgrammingError("SELECT", {}, Exception("syntax error"))

    monkeypatch.setattr(crud, "create_job", broken)
    with api_client(settings) as client:
        answer = client.post("/v1/jobs", json=job_body())
    assert_problem(answer, 500)
    assert "Retry-After" not in answer.headers


def test_a_request_that_finds_every_database_slot_taken_gets_503(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    narrow = settings.model_copy(
        update={"db_pool_size": 1, "db_max_overflow": 0, "db_pool_timeout_s": 0.2}
    )
    entered, release = threading.Event(), threading.Event()
    real_get_job = crud.get_job

    def slow_get_job(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(WAIT_S)  # holds the only slot until the second request was answered
        return real_get_job(*args, **kwargs)

    monkeypatch.setattr(crud, "get_job", slow_get_job)
    answers: dict[str, Any] = {}
    with api_client(narrow) as client:
        holder = threading.Thread(
            target=lambda: answers.update(first=client.get("/v1/jobs/nope")), daemon=True
        )
        holder.start()
        assert entered.wait(WAIT_S)
        second = client.get("/v1/jobs")
        release.set()
        holder.join(WAIT_S)
        third = client.get("/v1/jobs")  # the slot came back
    body = assert_problem(second, 503)
    assert second.headers["Retry-After"] == str(narrow.busy_retry_after_s)
    assert "capacity" in body["detail"]
    assert answers["first"].status_code == 404
    assert third.status_code == 200


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    backoff = Backoff(base_s=1.0, cap_s=8.0)
    for failures, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (10, 8.0), (10**6, 8.0)]:
        delays = [backoff.delay(failures) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len({backoff.delay(3) for _ in range(50)}) > 1  # jittered, not lockstep
    with pytest.raises(ValueError, match="base_s"):
        Backoff(base_s=2.0, cap_s=1.0)


def test_retry_transient_retries_only_what_passes() -> None:
    waits: list[float] = []
    outcomes: list[Exception | str] = [LOCKED, POOL_FULL, "done"]

    def call() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert retry_transient(call, what="test", attempts=3, sleep=waits.append) == "done"
    assert len(waits) == 2

    def locked() -> str:
        raise LOCKED

    with pytest.raises(sa_exc.OperationalError):
        retry_transient(locked, what="t", attempts=2, sleep=waits.append)
    with pytest.raises(KeyError):
        retry_transient(lambda: {}["x"], what="t", attempts=5, sleep=waits.append)
    assert len(waits) == 3  # one more for the locked call; none for the KeyError
    assert is_transient(LOCKED) and is_transient(POOL_FULL)
    assert not is_transient(sa_exc.IntegrityError("INSERT", {}, Exception("duplicate")))
    # SQLite uses OperationalError for permanent faults too: those are not "come back later".
    missing = sqlite3.OperationalError("no such table: jobs")
    assert not is_transient(sa_exc.OperationalError("SELECT", {}, missing))
    postgres_down = Exception("server closed the connection unexpectedly")
    assert is_transient(sa_exc.OperationalError("SELECT", {}, postgres_down))
