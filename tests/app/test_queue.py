"""Queue semantics on SQLite and PostgreSQL: racing claims hand out each job exactly once,
writes are fenced by the lease, heartbeats keep a lease alive, the reaper requeues with
bounded attempts and then fails with a reason, and cancellation works in every state."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import Engine, text

from bitplan.app import crud, queue
from bitplan.app.db import make_engine, make_sessionmaker
from bitplan.app.job_progress import ProgressSnapshot
from bitplan.app.models import Job, utcnow
from bitplan.app.states import JobState

LEASE_S = 1.0


def _snapshot(stage_progress: float, progress: float) -> ProgressSnapshot:
    """A search-stage snapshot (3 s left in the stage, 6 s in the job)."""
    return ProgressSnapshot(
        stage="search",
        stage_progress=stage_progress,
        stage_eta_s=3.0,
        progress=progress,
        eta_s=6.0,
    )


def _enqueue(engine: Engine, count: int = 1, *, max_attempts: int = 3) -> list[str]:
    with make_sessionmaker(engine)() as session:
        return [
            crud.create_job(
                session,
                owner_id=None,
                spec={"model": "builtin:digits-cnn", "n": i},
                model_id=None,
                dataset_id=None,
                idempotency_key=None,
                request_hash=None,
                max_attempts=max_attempts,
            ).id
            for i in range(count)
        ]


def _job(engine: Engine, job_id: str) -> Job:
    with make_sessionmaker(engine)() as session:
        job = crud.get_job(session, job_id=job_id, owner_id=None)
        assert job is not None
        return job


def test_racing_workers_claim_each_job_exactly_once(db_url: str, engine: Engine) -> None:
    job_ids = _enqueue(engine, 24)
    claimed: list[tuple[str, str]] = []
    start = threading.Barrier(4)

    def worker(name: str) -> None:
        own_engine = make_engine(db_url)  # separate pools: separate connections, like processes
        start.wait()
        while (job := queue.claim_job(own_engine, worker_id=name, lease_s=LEASE_S)) is not None:
            claimed.append((job.id, name))
        own_engine.dispose()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    counts = Counter(job_id for job_id, _ in claimed)
    assert sorted(counts) == sorted(job_ids)
    assert set(counts.values()) == {1}
    for job_id, name in claimed:
        job = _job(engine, job_id)
        assert (job.state, job.lease_owner, job.attempts, job.lease_version) == (
            "running",
            name,
            1,
            1,
        )


def test_claim_takes_oldest_first_and_none_when_idle(engine: Engine) -> None:
    first, second = _enqueue(engine, 2)
    assert queue.claim_job(engine, worker_id="a", lease_s=LEASE_S).id == first
    assert queue.claim_job(engine, worker_id="a", lease_s=LEASE_S).id == second
    assert queue.claim_job(engine, worker_id="a", lease_s=LEASE_S) is None
    started = _job(engine, first).started_at
    assert started is not None and started.tzinfo is not None


def test_stale_holder_is_fenced_out(engine: Engine) -> None:
    (job_id,) = _enqueue(engine)
    old = queue.claim_job(engine, worker_id="old", lease_s=LEASE_S)
    later = utcnow() + timedelta(seconds=10 * LEASE_S)
    assert queue.reap_expired(engine, now=later) == 1
    new = queue.claim_job(engine, worker_id="new", lease_s=LEASE_S)
    assert new.id == job_id and new.lease_version == old.lease_version + 1
    fence = {"job_id": job_id, "lease_version": old.lease_version}
    assert not queue.heartbeat(engine, worker_id="old", lease_s=LEASE_S, **fence)
    assert not queue.set_progress(engine, snapshot=_snapshot(0.9, 0.95), **fence)
    assert not queue.finish_job(engine, state="failed", error="stale", **fence)
    assert not queue.release_job(engine, **fence)
    assert queue.set_progress(
        engine, job_id=job_id, lease_version=new.lease_version, snapshot=_snapshot(0.5, 0.7)
    )
    job = _job(engine, job_id)
    assert (job.stage, job.stage_progress, job.stage_eta_s, job.progress, job.eta_s) == (
        "search",
        0.5,
        3.0,
        0.7,
        6.0,
    )
    assert queue.finish_job(
        engine,
        job_id=job_id,
        lease_version=new.lease_version,
        state="succeeded",
        result={"plan_ids": ["p"]},
    )
    job = _job(engine, job_id)
    assert (job.state, job.error, job.result, job.progress, job.stage_progress) == (
        JobState.SUCCEEDED,
        None,
        {"plan_ids": ["p"]},
        1.0,
        1.0,
    )
    assert job.lease_owner is None and job.finished_at is not None
    assert job.eta_s is None and job.stage_eta_s is None
    # finished: nobody can write any more, not even the last holder
    assert not queue.finish_job(
        engine, job_id=job_id, lease_version=new.lease_version, state="failed"
    )


def test_heartbeat_keeps_the_lease_alive(engine: Engine) -> None:
    _enqueue(engine)
    now = utcnow()
    job = queue.claim_job(engine, worker_id="w", lease_s=LEASE_S, now=now)
    almost = now + timedelta(seconds=0.9 * LEASE_S)
    assert queue.heartbeat(
        engine,
        job_id=job.id,
        worker_id="w",
        lease_version=job.lease_version,
        lease_s=LEASE_S,
        now=almost,
    )
    assert queue.reap_expired(engine, now=now + timedelta(seconds=1.5 * LEASE_S)) == 0
    assert queue.reap_expired(engine, now=almost + timedelta(seconds=1.1 * LEASE_S)) == 1
    assert not queue.heartbeat(
        engine,
        job_id=job.id,
        worker_id="someone-else",
        lease_version=job.lease_version,
        lease_s=LEASE_S,
    )


def test_reaper_requeues_until_attempts_run_out_then_fails(engine: Engine) -> None:
    (job_id,) = _enqueue(engine, max_attempts=2)
    later = utcnow() + timedelta(seconds=10 * LEASE_S)
    queue.claim_job(engine, worker_id="w1", lease_s=LEASE_S)
    assert queue.reap_expired(engine, now=later) == 1
    job = _job(engine, job_id)
    assert (job.state, job.attempts, job.lease_owner) == ("queued", 1, None)
    assert queue.claim_job(engine, worker_id="w2", lease_s=LEASE_S).attempts == 2
    assert queue.reap_expired(engine, now=later) == 1
    job = _job(engine, job_id)
    assert job.state == "failed" and job.finished_at is not None
    assert "w2" in job.error and "attempt 2 of 2" in job.error
    assert queue.reap_expired(engine, now=later) == 0  # idempotent
    assert queue.claim_job(engine, worker_id="w3", lease_s=LEASE_S) is None


def test_cancel_queued_running_and_expired_jobs(engine: Engine) -> None:
    queued, running, lost = _enqueue(engine, 3)
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        job = crud.request_cancel(session, job_id=queued, owner_id=None)
        assert job.state == "cancelled" and job.finished_at is not None
    first = queue.claim_job(engine, worker_id="w", lease_s=LEASE_S)
    second = queue.claim_job(engine, worker_id="w", lease_s=LEASE_S)
    assert (first.id, second.id) == (running, lost)  # the cancelled job is never claimed
    assert not queue.is_cancel_requested(engine, job_id=running)
    with sessions() as session:
        for job_id in (running, lost):
            job = crud.request_cancel(session, job_id=job_id, owner_id=None)
            assert job.state == "running" and job.cancel_requested
        assert crud.request_cancel(session, job_id=running, owner_id="other") is None
    assert queue.is_cancel_requested(engine, job_id=running)
    assert queue.finish_job(
        engine, job_id=running, lease_version=first.lease_version, state="cancelled"
    )
    # a cancelled job whose worker died is cancelled by the reaper, not requeued
    assert queue.reap_expired(engine, now=utcnow() + timedelta(seconds=10 * LEASE_S)) == 1
    assert [_job(engine, i).state for i in (queued, running, lost)] == ["cancelled"] * 3


def test_release_returns_the_job_without_spending_an_attempt(engine: Engine) -> None:
    (job_id,) = _enqueue(engine)
    job = queue.claim_job(engine, worker_id="w", lease_s=LEASE_S)
    assert queue.release_job(engine, job_id=job_id, lease_version=job.lease_version)
    row = _job(engine, job_id)
    assert (row.state, row.attempts, row.lease_owner, row.lease_expires_at) == (
        "queued",
        0,
        None,
        None,
    )
    again = queue.claim_job(engine, worker_id="w", lease_s=LEASE_S)
    assert (again.attempts, again.lease_version) == (1, 2)


def test_finish_needs_a_terminal_state(engine: Engine) -> None:
    _enqueue(engine)
    job = queue.claim_job(engine, worker_id="w", lease_s=LEASE_S)
    with pytest.raises(ValueError, match="terminal|succeeded"):
        queue.finish_job(engine, job_id=job.id, lease_version=job.lease_version, state="queued")


def test_requeued_job_starts_its_progress_over(engine: Engine) -> None:
    """Overall progress only grows within an attempt; a job back in the queue shows 0 again, and
    a failed one keeps how far it got."""
    (job_id,) = _enqueue(engine, max_attempts=2)
    first = queue.claim_job(engine, worker_id="w1", lease_s=LEASE_S)
    fence = {"job_id": job_id, "lease_version": first.lease_version}
    assert queue.set_progress(engine, snapshot=_snapshot(0.5, 0.7), **fence)
    assert queue.reap_expired(engine, now=utcnow() + timedelta(seconds=10 * LEASE_S)) == 1
    job = _job(engine, job_id)
    assert (job.state, job.stage, job.progress, job.stage_progress) == ("queued", "queued", 0, 0)
    assert job.eta_s is None and job.stage_eta_s is None
    second = queue.claim_job(engine, worker_id="w2", lease_s=LEASE_S)
    fence = {"job_id": job_id, "lease_version": second.lease_version}
    assert queue.set_progress(engine, snapshot=_snapshot(0.25, 0.55), **fence)
    assert queue.finish_job(engine, state=JobState.FAILED, error="boom", **fence)
    job = _job(engine, job_id)
    assert (job.state, job.progress, job.stage_progress, job.eta_s) == ("failed", 0.55, 0.25, None)


def test_state_is_a_job_state_stored_as_its_plain_value(engine: Engine) -> None:
    (job_id,) = _enqueue(engine)
    job = _job(engine, job_id)
    assert type(job.state) is JobState and job.state is JobState.QUEUED
    with engine.connect() as connection:
        stored = connection.scalar(text("SELECT state FROM jobs WHERE id = :id"), {"id": job_id})
    assert stored == "queued" and type(stored) is str
