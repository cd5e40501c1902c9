"""Worker presence in the database: which workers are alive right now.

Every worker (embedded in ``bitplan serve`` or started on another machine) keeps one row of
the ``workers`` table fresh from a background thread, independent of the job it runs; the API
counts the rows seen within one lease (``Settings.lease_seconds``, the same time after which
a silent worker's job is reclaimed) to answer health and readiness. A worker that stops cleanly
deletes its row; a killed one stops renewing it and goes stale. The database is the one place
both the API and workers on every machine already share, so no file or socket is needed.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from bitplan.app.models import WorkerBeat, utcnow

__all__ = ["WorkerPresence", "count_alive", "forget_worker", "record_beat"]

logger = logging.getLogger(__name__)

# Rows of workers unseen for this long are deleted when a worker starts: killed workers do not
# clean up after themselves, and a day keeps their last sighting around for a person to see.
_PRUNE_AFTER = timedelta(days=1)


def record_beat(engine: Engine, worker_id: str, *, now: datetime | None = None) -> None:
    """Mark ``worker_id`` as seen ``now`` (its row is created on the first beat)."""
    now = now or utcnow()
    with Session(engine) as session, session.begin():
        renewed = session.execute(
            update(WorkerBeat).where(WorkerBeat.id == worker_id).values(last_seen_at=now)
        )
        if renewed.rowcount == 0:  # type: ignore[attr-defined]  # CursorResult of an UPDATE
            session.add(WorkerBeat(id=worker_id, started_at=now, last_seen_at=now))


def forget_worker(engine: Engine, worker_id: str) -> None:
    """Delete the row of a worker that stopped (or was seen dead by its supervisor)."""
    with Session(engine) as session, session.begin():
        session.execute(delete(WorkerBeat).where(WorkerBeat.id == worker_id))


def _prune(engine: Engine, *, now: datetime) -> None:
    with Session(engine) as session, session.begin():
        session.execute(delete(WorkerBeat).where(WorkerBeat.last_seen_at < now - _PRUNE_AFTER))


def count_alive(session: Session, *, within_s: float, now: datetime | None = None) -> int:
    """How many workers beat within the last ``within_s`` seconds."""
    since = (now or utcnow()) - timedelta(seconds=within_s)
    alive = session.scalar(
        select(func.count()).select_from(WorkerBeat).where(WorkerBeat.last_seen_at >= since)
    )
    return int(alive or 0)


class WorkerPresence:
    """A daemon thread that beats for one worker every ``interval_s`` seconds until stopped.

    Database errors are logged and retried on the next beat: presence must never end the
    worker it reports on (a worker that misses beats only looks dead for a while).
    """

    def __init__(self, engine: Engine, worker_id: str, *, interval_s: float) -> None:
        self.engine, self.worker_id, self.interval_s = engine, worker_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"presence-{worker_id}", daemon=True)

    def start(self) -> WorkerPresence:
        try:
            _prune(self.engine, now=utcnow())
        except SQLAlchemyError as exc:
            logger.warning("worker %s: could not prune stale worker rows: %s", self.worker_id, exc)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                record_beat(self.engine, self.worker_id)
            except SQLAlchemyError as exc:
                logger.warning("worker %s: presence beat failed: %s", self.worker_id, exc)
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        """Stop beating and delete this worker's row (best effort: a stale row expires)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            forget_worker(self.engine, self.worker_id)
        except SQLAlchemyError as exc:
            logger.warning("worker %s: could not remove its presence row: %s", self.worker_id, exc)
