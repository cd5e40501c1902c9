"""One job, many workers, before the search: shards of a job's sensitivity table in the queue.

A job's sensitivity analysis scores every planned layer in every format; on a large model
that per-layer scoring is most of the stage (the data passes are the rest), and it splits by
layer. This module keeps the split in the database, like :mod:`bitplan.app.search_peers` keeps
places in a search:

* **Open.** When a job reaches its analyze stage and sharding is on (setting
  ``BITPLAN_SENSITIVITY_SHARDS``, the number of shards; 0 or 1 = off), its worker splits the
  planned layers (:func:`bitplan.sensitivity.shards.split_layers`: whole tie and share groups,
  balanced by size) and inserts one ``sensitivity_shards`` row each, tied to its attempt
  (``job_lease_version``); an earlier attempt's rows are replaced.
* **Claim.** Any worker, the job's own or an idle one (no queued job, before it looks for a
  search to join), claims free or expired shards in one statement, exactly like
  :func:`bitplan.app.queue.claim_job` (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, ``BEGIN
  IMMEDIATE`` on SQLite), only while the job runs at that attempt and was not cancelled. It
  renews its lease while it works, writes the shard's table into the job's staging folder and
  marks the shard done (:mod:`bitplan.app.shard_work`).
* **Close.** The job's worker merges the tables once every shard is done and deletes the rows;
  a cancelled, failed or reclaimed attempt deletes them too (or the next attempt replaces
  them), and a worker whose lease cannot be renewed stops. A dead worker's lease runs out and
  its shard is claimed again. A shard that another worker failed to compute (``failures``) is
  left to the job's own worker, which fails the job with the real error if it fails too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, delete, exists, insert, or_, select, update

from bitplan.app.models import Job, SensitivityShard, utcnow
from bitplan.app.queue import _writing
from bitplan.app.states import JobState

__all__ = [
    "ClaimedShard",
    "claim_shards",
    "close_shards",
    "finish_shard",
    "open_shards",
    "release_shards",
    "renew_shards",
    "shards_done",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimedShard:
    """A claimed shard, and what a worker needs to compute it."""

    id: int
    job_id: str
    shard: int
    job_lease_version: int
    layers: list[str]
    spec: dict[str, Any]


def open_shards(
    engine: Engine, *, job_id: str, lease_version: int, shards: Sequence[Sequence[str]]
) -> int:
    """Insert ``shards`` (layer names each) for ``job_id``'s attempt ``lease_version`` (an
    earlier attempt's are replaced); none unless that attempt still holds the job."""
    with _writing(engine) as connection:
        connection.execute(delete(SensitivityShard).where(SensitivityShard.job_id == job_id))
        held = connection.scalar(
            select(Job.id).where(
                Job.id == job_id,
                Job.lease_version == lease_version,
                Job.state == JobState.RUNNING,
            )
        )
        if held is None or not shards:
            return 0
        connection.execute(
            insert(SensitivityShard),
            [
                {
                    "job_id": job_id,
                    "shard": index,
                    "job_lease_version": lease_version,
                    "layers": list(names),
                    "done": False,
                    "failures": 0,
                }
                for index, names in enumerate(shards)
            ],
        )
    return len(shards)


def close_shards(engine: Engine, *, job_id: str, lease_version: int) -> None:
    """Delete the shards of the job's attempt ``lease_version`` (never a later attempt's):
    workers still computing one find their lease gone and stop."""
    with _writing(engine) as connection:
        connection.execute(
            delete(SensitivityShard).where(
                SensitivityShard.job_id == job_id,
                SensitivityShard.job_lease_version == lease_version,
            )
        )


def _job_open() -> Any:
    """The job of a shard runs at the shard's attempt and was not cancelled."""
    return exists().where(
        Job.id == SensitivityShard.job_id,
        Job.lease_version == SensitivityShard.job_lease_version,
        Job.state == JobState.RUNNING,
        Job.cancel_requested.is_(False),
    )


def claim_shards(
    engine: Engine,
    *,
    worker_id: str,
    lease_s: float,
    job_id: str | None = None,
    limit: int | None = 1,
    own_job: bool = False,
    now: datetime | None = None,
) -> list[ClaimedShard]:
    """Lease free (or expired) shards to ``worker_id``: of the oldest running job, or of
    ``job_id``; at most ``limit`` (None: all). Shards another worker failed to compute go only
    to the job's own worker (``own_job``). Empty when none is free."""
    now = now or utcnow()
    free = and_(
        SensitivityShard.done.is_(False),
        or_(SensitivityShard.worker_id.is_(None), SensitivityShard.lease_expires_at < now),
    )
    chosen = (
        select(SensitivityShard.id)
        .join(Job, Job.id == SensitivityShard.job_id)
        .where(
            free,
            Job.lease_version == SensitivityShard.job_lease_version,
            Job.state == JobState.RUNNING,
            Job.cancel_requested.is_(False),
        )
        .order_by(Job.created_at, SensitivityShard.job_id, SensitivityShard.shard)
        .limit(limit)
        .with_for_update(skip_locked=True, of=SensitivityShard)  # dropped on SQLite
    )
    if job_id is not None:
        chosen = chosen.where(SensitivityShard.job_id == job_id)
    if not own_job:
        chosen = chosen.where(SensitivityShard.failures == 0)
    statement = (
        update(SensitivityShard)
        .where(SensitivityShard.id.in_(chosen), free)
        .values(worker_id=worker_id, lease_expires_at=now + timedelta(seconds=lease_s))
        .returning(
            SensitivityShard.id,
            SensitivityShard.job_id,
            SensitivityShard.shard,
            SensitivityShard.job_lease_version,
            SensitivityShard.layers,
        )
    )
    with _writing(engine) as connection:
        rows = sorted(connection.execute(statement).all(), key=lambda row: row.shard)
        if not rows:
            return []
        spec = connection.execute(select(Job.spec).where(Job.id == rows[0].job_id)).scalar_one()
    logger.info(
        "worker %s takes sensitivity shard(s) %s of job %s",
        worker_id,
        ", ".join(str(row.shard) for row in rows),
        rows[0].job_id,
    )
    return [
        ClaimedShard(
            id=row.id,
            job_id=row.job_id,
            shard=row.shard,
            job_lease_version=row.job_lease_version,
            layers=list(row.layers),
            spec=dict(spec),
        )
        for row in rows
    ]


def _held(shard_ids: Sequence[int], worker_id: str) -> Any:
    """Shards ``shard_ids`` that ``worker_id`` holds, not yet done, of an open job."""
    return and_(
        SensitivityShard.id.in_(shard_ids),
        SensitivityShard.worker_id == worker_id,
        SensitivityShard.done.is_(False),
        _job_open(),
    )


def renew_shards(
    engine: Engine,
    *,
    shard_ids: Sequence[int],
    worker_id: str,
    lease_s: float,
    now: datetime | None = None,
) -> int:
    """Extend the leases of ``worker_id``'s shards; returns how many it still holds (fewer than
    ``shard_ids`` when a shard was taken over, closed, or its job is no longer open to it)."""
    expires = (now or utcnow()) + timedelta(seconds=lease_s)
    statement = (
        update(SensitivityShard).where(_held(shard_ids, worker_id)).values(lease_expires_at=expires)
    )
    with _writing(engine) as connection:
        return connection.execute(statement).rowcount


def finish_shard(engine: Engine, *, shard_id: int, worker_id: str) -> bool:
    """Mark a held shard done (its table is written); False when it was not this worker's
    any more. ``worker_id`` stays on the row: who computed it."""
    statement = (
        update(SensitivityShard)
        .where(_held([shard_id], worker_id))
        .values(done=True, lease_expires_at=None)
    )
    with _writing(engine) as connection:
        return connection.execute(statement).rowcount == 1


def release_shards(
    engine: Engine, *, shard_ids: Sequence[int], worker_id: str, failed: bool = False
) -> None:
    """Hand held shards back unfinished (a worker stopping), at once rather than when their
    lease runs out; ``failed`` counts a failure on each (it goes to the job's own worker)."""
    statement = (
        update(SensitivityShard)
        .where(
            SensitivityShard.id.in_(shard_ids),
            SensitivityShard.worker_id == worker_id,
            SensitivityShard.done.is_(False),
        )
        .values(
            worker_id=None,
            lease_expires_at=None,
            failures=SensitivityShard.failures + (1 if failed else 0),
        )
    )
    with _writing(engine) as connection:
        connection.execute(statement)


def shards_done(engine: Engine, *, job_id: str, lease_version: int) -> dict[int, bool]:
    """``{shard: done}`` of the job's attempt (empty once its shards are closed)."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(SensitivityShard.shard, SensitivityShard.done).where(
                SensitivityShard.job_id == job_id,
                SensitivityShard.job_lease_version == lease_version,
            )
        ).all()
    return {row.shard: bool(row.done) for row in rows}
