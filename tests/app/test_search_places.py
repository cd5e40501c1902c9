"""Places in a running job's search (app/search_peers.py), on SQLite and PostgreSQL: each is
claimed by one worker, only while the job runs at the attempt that opened it and is not
cancelled; an expired lease frees it; closing the places ends every joined worker's lease."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine, update

from bitplan.app import queue
from bitplan.app.models import Job, utcnow
from bitplan.app.search_peers import claim_place, close_places, open_places, renew_place
from tests.app._api_fixtures import enqueue_job


def _running_job(engine: Engine) -> queue.ClaimedJob:
    enqueue_job(engine, trials=4)
    job = queue.claim_job(engine, worker_id="main", lease_s=30)
    assert job is not None
    return job


def test_each_place_goes_to_one_worker_until_its_lease_expires(engine: Engine) -> None:
    job = _running_job(engine)
    assert claim_place(engine, worker_id="early", lease_s=30) is None  # nothing open yet
    assert open_places(engine, job_id=job.id, lease_version=job.lease_version, count=2) == 2
    first = claim_place(engine, worker_id="a", lease_s=30)
    second = claim_place(engine, worker_id="b", lease_s=30)
    assert first is not None and second is not None
    assert (first.slot, second.slot) == (1, 2)
    assert (first.job_id, first.spec, first.attempts) == (job.id, job.spec, job.attempts)
    assert claim_place(engine, worker_id="c", lease_s=30) is None  # both taken
    later = utcnow() + timedelta(seconds=60)  # a's lease ran out (a died)
    taken = claim_place(engine, worker_id="c", lease_s=30, now=later)
    assert taken is not None and taken.slot == 1
    assert not renew_place(engine, place_id=first.id, worker_id="a", lease_s=30)
    assert renew_place(engine, place_id=taken.id, worker_id="c", lease_s=30)


def test_places_end_with_the_search_the_attempt_or_a_cancel(engine: Engine) -> None:
    job = _running_job(engine)
    open_places(engine, job_id=job.id, lease_version=job.lease_version, count=1)
    place = claim_place(engine, worker_id="a", lease_s=30)
    assert place is not None
    with engine.begin() as connection:  # the user cancels the job
        connection.execute(update(Job).where(Job.id == job.id).values(cancel_requested=True))
    assert not renew_place(engine, place_id=place.id, worker_id="a", lease_s=30)
    with engine.begin() as connection:
        connection.execute(update(Job).where(Job.id == job.id).values(cancel_requested=False))
    assert renew_place(engine, place_id=place.id, worker_id="a", lease_s=30)
    close_places(engine, job_id=job.id, lease_version=job.lease_version)  # the search is over
    assert not renew_place(engine, place_id=place.id, worker_id="a", lease_s=30)
    # An attempt that no longer holds the job opens nothing.
    assert open_places(engine, job_id=job.id, lease_version=job.lease_version + 1, count=2) == 0
    assert claim_place(engine, worker_id="b", lease_s=30) is None


def test_a_late_close_of_an_old_attempt_leaves_the_new_attempts_places(engine: Engine) -> None:
    job = _running_job(engine)
    open_places(engine, job_id=job.id, lease_version=job.lease_version, count=1)
    with engine.begin() as connection:  # the attempt lost its lease; another worker took over
        connection.execute(
            update(Job).where(Job.id == job.id).values(lease_version=job.lease_version + 1)
        )
    assert open_places(engine, job_id=job.id, lease_version=job.lease_version + 1, count=1) == 1
    close_places(engine, job_id=job.id, lease_version=job.lease_version)  # the old one, late
    place = claim_place(engine, worker_id="a", lease_s=30)
    assert place is not None  # the new attempt's place is still open
