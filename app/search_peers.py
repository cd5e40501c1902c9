"""One job, many workers: idle workers join a running job's measured search.

A job's search stage runs Optuna trials, each a forward pass over the calibration split; on a
shared Optuna storage (PostgreSQL) any number of processes can run trials of one study
(:mod:`bitplan.search.measured`: the study's total is shared, no trial is counted twice, a dead
process's trial is failed by Optuna's heartbeat and sampled again). This module lets the
service use that:

* **Places.** When a job reaches its search stage, its worker opens ``search_peers`` places
  (setting ``BITPLAN_SEARCH_PEERS``, 0 = off) in the ``search_peers`` table, tied to its
  attempt (``job_lease_version``), and deletes them when the search ends (or the attempt ends
  in any way). The job's sensitivity table is in its staging folder by then.
* **Claim.** An idle worker (no queued job) claims a free or expired place in one statement,
  exactly like :func:`bitplan.app.queue.claim_job` (``FOR UPDATE SKIP LOCKED`` on PostgreSQL,
  ``BEGIN IMMEDIATE`` on SQLite), only while the job is running at that attempt and not
  cancelled. Queued jobs come first: a worker joins only when :func:`claim_job` found nothing.
* **Run.** The joining worker rebuilds the job's problem from its table
  (:func:`bitplan.search.joined.join_search`: same model, data split and error, no
  re-analysis) and runs sampler trials on the job's study with seed ``spec.seed + slot``,
  renewing its place's lease every heartbeat. It stops when the study holds the job's trials,
  when the lease cannot be renewed (places closed: the search is over; job cancelled, failed,
  finished or reclaimed), or on SIGTERM; its unfinished trial is then pruned or, if the
  process died, failed by Optuna's heartbeat. It writes nothing but trials.

The job's own worker keeps seeds, guided trials, validation and artifacts, and reads every
worker's trials when it builds the Pareto set.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy import Engine, delete, exists, insert, or_, select, update

from bitplan.app.db import is_transient
from bitplan.app.models import Job, SearchPeer, utcnow
from bitplan.app.queue import _writing
from bitplan.app.settings import Settings
from bitplan.app.states import JobKind, JobState
from bitplan.search.joined import join_search
from bitplan.search.measured import rdb_storage
from bitplan.search.spec import JobSpec

__all__ = [
    "PeerPlace",
    "SearchOpening",
    "claim_place",
    "close_places",
    "join_running_search",
    "open_places",
    "renew_place",
    "staging_dir",
    "study_name_for",
    "study_storage",
]

logger = logging.getLogger(__name__)

# How often the joining worker's main thread wakes to notice SIGTERM or a finished search.
_TICK_S = 0.1
_SEARCH_STAGE = "search"


def study_name_for(job_id: str, *, attempt: int) -> str:
    """The Optuna study of one attempt of a job. A retried job (its worker died) starts a fresh
    study: the dead attempt's study still holds trials in state RUNNING that nobody will finish,
    and a sampler sharing that study would count them and seed from them."""
    return f"bitplan-{job_id}-attempt{attempt}"


def staging_dir(artifact_dir: Path, job_id: str, lease_version: int) -> Path:
    """The private folder one attempt of a job writes its artifacts into before publishing."""
    return artifact_dir / f".{job_id}.{lease_version}.partial"


@contextmanager
def study_storage(settings: Settings) -> Iterator[optuna.storages.BaseStorage | None]:
    """The settings' Optuna storage with their heartbeat, closed afterwards; None without one
    (each search then keeps an in-memory study)."""
    if not settings.optuna_storage:
        yield None
        return
    storage = rdb_storage(
        settings.optuna_storage,
        heartbeat_s=settings.optuna_heartbeat_s,
        grace_s=settings.optuna_grace_s,
    )
    try:
        yield storage
    finally:
        storage.remove_session()
        storage.engine.dispose()


@dataclass(frozen=True)
class PeerPlace:
    """A claimed place in a running job's search, and what the joining worker needs."""

    id: int
    job_id: str
    slot: int
    job_lease_version: int
    spec: dict[str, Any]
    attempts: int


def open_places(engine: Engine, *, job_id: str, lease_version: int, count: int) -> int:
    """Open ``count`` places in the search of ``job_id``'s attempt ``lease_version`` (an
    earlier attempt's places are replaced); none unless that attempt still holds the job."""
    with _writing(engine) as connection:
        connection.execute(delete(SearchPeer).where(SearchPeer.job_id == job_id))
        held = connection.scalar(
            select(Job.id).where(
                Job.id == job_id,
                Job.lease_version == lease_version,
                Job.state == JobState.RUNNING,
            )
        )
        if held is None or count <= 0:
            return 0
        connection.execute(
            insert(SearchPeer),
            [
                {"job_id": job_id, "slot": slot, "job_lease_version": lease_version}
                for slot in range(1, count + 1)
            ],
        )
    return count


def close_places(engine: Engine, *, job_id: str, lease_version: int) -> None:
    """Delete the places this attempt opened: joined workers find their lease gone and stop.

    Only this attempt's: an attempt that lost the job and closes late must not end the search
    of the attempt that took the job over."""
    with _writing(engine) as connection:
        connection.execute(
            delete(SearchPeer).where(
                SearchPeer.job_id == job_id, SearchPeer.job_lease_version == lease_version
            )
        )


def _job_open() -> Any:
    """The job of a place runs at the place's attempt and was not cancelled."""
    return exists().where(
        Job.id == SearchPeer.job_id,
        Job.lease_version == SearchPeer.job_lease_version,
        Job.state == JobState.RUNNING,
        Job.cancel_requested.is_(False),
    )


def claim_place(
    engine: Engine, *, worker_id: str, lease_s: float, now: datetime | None = None
) -> PeerPlace | None:
    """Lease the first free (or expired) place of the oldest running job to ``worker_id``."""
    now = now or utcnow()
    free = or_(SearchPeer.worker_id.is_(None), SearchPeer.lease_expires_at < now)
    first = (
        select(SearchPeer.id)
        .join(Job, Job.id == SearchPeer.job_id)
        .where(
            free,
            Job.lease_version == SearchPeer.job_lease_version,
            Job.state == JobState.RUNNING,
            Job.cancel_requested.is_(False),
        )
        .order_by(Job.created_at, SearchPeer.job_id, SearchPeer.slot)
        .limit(1)
        .with_for_update(skip_locked=True, of=SearchPeer)  # dropped on SQLite (BEGIN IMMEDIATE)
        .scalar_subquery()
    )
    statement = (
        update(SearchPeer)
        .where(SearchPeer.id == first, free)
        .values(worker_id=worker_id, lease_expires_at=now + timedelta(seconds=lease_s))
        .returning(SearchPeer.id, SearchPeer.job_id, SearchPeer.slot, SearchPeer.job_lease_version)
    )
    with _writing(engine) as connection:
        place = connection.execute(statement).first()
        if place is None:
            return None
        job = connection.execute(select(Job.spec, Job.attempts).where(Job.id == place.job_id)).one()
    logger.info(
        "worker %s joins the search of job %s (place %d)", worker_id, place.job_id, place.slot
    )
    return PeerPlace(
        id=place.id,
        job_id=place.job_id,
        slot=place.slot,
        job_lease_version=place.job_lease_version,
        spec=job.spec,
        attempts=job.attempts,
    )


def renew_place(
    engine: Engine, *, place_id: int, worker_id: str, lease_s: float, now: datetime | None = None
) -> bool:
    """Extend the place's lease; False when the search is no longer open to this worker."""
    now = now or utcnow()
    statement = (
        update(SearchPeer)
        .where(SearchPeer.id == place_id, SearchPeer.worker_id == worker_id, _job_open())
        .values(lease_expires_at=now + timedelta(seconds=lease_s))
    )
    with _writing(engine) as connection:
        return connection.execute(statement).rowcount == 1


def _drop_place(engine: Engine, *, place_id: int, worker_id: str) -> None:
    """Delete a place this worker could not use (the others would fail the same way)."""
    with _writing(engine) as connection:
        connection.execute(
            delete(SearchPeer).where(SearchPeer.id == place_id, SearchPeer.worker_id == worker_id)
        )


class SearchOpening:
    """The job's side: opens places when its pipeline reports the search stage, closes them at
    the next stage or when the attempt ends. Best effort: a database that says "not now" only
    costs the job its extra workers."""

    def __init__(
        self, engine: Engine, settings: Settings, *, job_id: str, lease_version: int, kind: str
    ) -> None:
        self.engine, self.job_id, self.lease_version = engine, job_id, lease_version
        self.count = settings.search_peers if settings.optuna_storage else 0
        if kind != JobKind.SEARCH:
            self.count = 0
        self.state = "before"  # before → open → closed

    def on_stage(self, stage: str) -> None:
        if self.count == 0:
            return
        if self.state == "before" and stage == _SEARCH_STAGE:
            self.state = "open"
            self._try(
                lambda: open_places(
                    self.engine,
                    job_id=self.job_id,
                    lease_version=self.lease_version,
                    count=self.count,
                ),
                "open",
            )
        elif self.state == "open" and stage != _SEARCH_STAGE:
            self.close()

    def close(self) -> None:
        if self.count and self.state == "open":
            self.state = "closed"
            self._try(
                lambda: close_places(
                    self.engine, job_id=self.job_id, lease_version=self.lease_version
                ),
                "close",
            )

    def _try(self, action: Callable[[], object], what: str) -> None:
        try:
            action()
        except Exception as error:
            if not is_transient(error):
                raise
            logger.warning("job %s: could not %s search places (%s)", self.job_id, what, error)


def join_running_search(
    engine: Engine,
    settings: Settings,
    *,
    worker_id: str,
    shutdown: threading.Event,
    clock: Callable[[], float],
) -> bool:
    """Claim a place in a running job's search and run trials there until it ends; False when
    no place is open (or joining is off)."""
    if settings.search_peers == 0 or not settings.optuna_storage:
        return False
    try:
        place = claim_place(engine, worker_id=worker_id, lease_s=settings.lease_seconds)
    except Exception as error:
        if not is_transient(error):
            raise
        logger.warning("worker %s: could not look for a search to join (%s)", worker_id, error)
        return False
    if place is None:
        return False
    stop = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            spec = JobSpec(**place.spec)
            with study_storage(settings) as storage:
                assert storage is not None  # checked above
                join_search(
                    spec,
                    table_dir=staging_dir(
                        settings.artifact_dir, place.job_id, place.job_lease_version
                    ),
                    storage=storage,
                    study_name=study_name_for(place.job_id, attempt=place.attempts),
                    seed=spec.seed + place.slot,
                    cache_dir=settings.cache_dir,
                    should_cancel=stop.is_set,
                )
        except Exception as error:  # noqa: BLE001 -- the job's own worker carries on alone
            logger.exception("worker %s: joining job %s failed", worker_id, place.job_id)
            failed.append(error)

    thread = threading.Thread(target=run, name=f"join-{place.job_id}", daemon=True)
    thread.start()
    next_beat = clock() + settings.heartbeat_seconds
    while thread.is_alive():
        thread.join(_TICK_S)
        if shutdown.is_set():
            stop.set()
        if clock() < next_beat or stop.is_set():
            continue
        next_beat = clock() + settings.heartbeat_seconds
        try:
            held = renew_place(
                engine, place_id=place.id, worker_id=worker_id, lease_s=settings.lease_seconds
            )
        except Exception as error:
            if not is_transient(error):
                raise
            logger.warning("worker %s: place not renewed (%s)", worker_id, error)
            continue
        if not held:
            logger.info("worker %s: the search of job %s is over", worker_id, place.job_id)
            stop.set()
    if failed:
        try:
            _drop_place(engine, place_id=place.id, worker_id=worker_id)
        except Exception as error:
            if not is_transient(error):
                raise
    return True
