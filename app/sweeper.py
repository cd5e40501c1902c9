"""Remove what a killed or failed process left behind, on disk and in the database.

Every intermediate of the service has a name the sweep recognises. Uploads are written as
``.upload-*.part``, renamed to their content address, then recorded in a row; validation
extracts zips under ``.validate-*`` and the model loader under ``unzipped/.unzip-*``; a job
attempt writes into ``artifact_dir/.{job}.{lease}.partial`` and renames it to
``artifact_dir/{job}`` right before the job succeeds. A process killed between those steps
(SIGKILL, OOM, a power cut) leaves the intermediate forever, and a file can also vanish under its
row (deleted by hand, a disk restored from an old backup). The sweep removes:

- temporary uploads, validation and extraction folders older than ``min_age_s``;
- stored upload files that no row records, older than ``min_age_s``;
- staging folders of attempts that are over (their job is not running under that lease);
- artifact folders of jobs that no longer exist, failed or were cancelled (never served);
- rows whose stored file is gone, unless a queued or running job still needs them (that job
  fails with a message that says the file is missing; the next sweep forgets the row), so the
  owner sees 404 and uploads the file again.

``min_age_s`` protects work in flight that only the file system can show: at start-up no
upload of this process is running, so 0 is safe when one API process owns the upload folder; a
periodic sweep (:class:`PeriodicSweep`, every ``Settings.sweep_interval_s``) passes
:func:`periodic_grace_s`: :data:`PERIODIC_GRACE_S`, or longer when an upload's check may take
longer (``Settings.validate_timeout_s``), since a stored upload gets its row only after its
check and its check's scratch folder lives as long as the check. What the database judges
needs no grace: a staging folder is created only after its claim was committed and is live
exactly while its job runs under its lease version; an artifact folder is created only by a
running attempt; a row is written only after its file.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session

from bitplan.app import crud
from bitplan.app.settings import Settings
from bitplan.app.uploads import PART_PREFIX, VALIDATE_PREFIX
from bitplan.sensitivity.safety import UNZIP_PREFIX

__all__ = [
    "PERIODIC_GRACE_S",
    "PeriodicSweep",
    "periodic_grace_s",
    "Swept",
    "sweep_orphans",
    "sweep_settings",
    "sweeping",
]

log = logging.getLogger(__name__)

# A periodic sweep spares anything younger than an hour: longer than any upload plus validation
# at the default limits (see periodic_grace_s for longer checks).
PERIODIC_GRACE_S = 3600.0
# Past an upload's check, what remains before its row exists: one insert, which waits at most
# for the database's busy timeout (30 s by default); a minute covers that with room.
_AFTER_CHECK_S = 60.0
# Seconds stop() waits for a sweep in progress: one sweep is a directory walk and a few queries.
_STOP_WAIT_S = 10.0
_KINDS = ("models", "datasets")
# The worker's staging folder of one attempt: .{job id}.{lease version}.partial
_STAGING = re.compile(r"^\.(?P<job>[^./]+)\.(?P<lease>\d+)\.partial$")

Sessions = Callable[[], Session]


@dataclass
class Swept:
    """What one sweep removed: paths from disk, and ids of rows whose file had vanished."""

    paths: list[Path] = field(default_factory=list)
    rows: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths) + len(self.rows)


def _old(path: Path, *, cutoff: float) -> bool:
    try:
        return path.lstat().st_mtime <= cutoff
    except FileNotFoundError:  # removed meanwhile by its owner
        return False


def _leftovers(upload_dir: Path, cache_dir: Path) -> Iterator[tuple[Path, bool]]:
    """Temporary files and folders, recognised by their prefixes, each with whether the API
    process owns it. Extraction folders belong to workers, which may outlive an API restart."""
    if upload_dir.is_dir():
        yield from ((path, True) for path in upload_dir.rglob(f"{PART_PREFIX}*.part"))
    if cache_dir.is_dir():
        yield from ((path, True) for path in cache_dir.glob(f"{VALIDATE_PREFIX}*"))
        yield from ((path, False) for path in cache_dir.glob(f"unzipped/{UNZIP_PREFIX}*"))


def _stored_files(upload_dir: Path) -> Iterator[Path]:
    """Content-addressed files under ``<kind>s/<owner>/`` (not the temporary ones)."""
    for kind in _KINDS:
        for path in (upload_dir / kind).glob("*/*"):
            if path.is_file() and not path.name.startswith("."):
                yield path


def _remove(path: Path, why: str, swept: Swept) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    swept.paths.append(path)
    # A warning: a leftover means a process died or a file was lost, which an operator may
    # want to know about even when the service cleans up after it.
    log.warning("sweep removed %s: %s", path, why)


def _sweep_uploads(
    session: Session, upload_dir: Path, cache_dir: Path, *, min_age_s: float, swept: Swept
) -> None:
    now = time.time()
    cutoff = now - min_age_s
    # A worker's extraction in flight is never this API's to judge: it gets the periodic grace.
    others_cutoff = now - max(min_age_s, PERIODIC_GRACE_S)
    for path, own in _leftovers(upload_dir, cache_dir):
        if _old(path, cutoff=cutoff if own else others_cutoff):
            _remove(path, "temporary file of a stopped upload or extraction", swept)
    for path in _stored_files(upload_dir):
        if not _old(path, cutoff=cutoff):  # the cheap check first: a query a file otherwise
            continue
        if not crud.blob_path_in_use(session, path=str(path.resolve())):
            _remove(path, "stored upload without a row", swept)


def _sweep_staging(session: Session, artifact_dir: Path, swept: Swept) -> None:
    """Staging folders whose attempt is over: its worker died (and the job was not retried:
    the retry's worker clears them itself), or the job was cancelled, released or finished."""
    folders = {}
    for path in artifact_dir.glob(".*.partial"):
        match = _STAGING.match(path.name)
        if match is not None and path.is_dir():
            folders[path] = (match["job"], int(match["lease"]))
    live = crud.running_lease_versions(session, job_ids={job for job, _ in folders.values()})
    for path, (job_id, lease) in folders.items():
        if live.get(job_id) != lease:
            _remove(
                path, f"staging folder of attempt {lease} of job {job_id}, which is over", swept
            )


def _is_job_id(name: str) -> bool:
    try:
        return str(uuid.UUID(name)) == name
    except ValueError:
        return False


def _sweep_artifacts(session: Session, artifact_dir: Path, swept: Swept) -> None:
    """Result folders nobody will serve: their job is gone, failed or was cancelled. Folders
    not named like a job id are not the service's and stay."""
    folders = {
        path.name: path
        for path in artifact_dir.iterdir()
        if path.is_dir() and not path.is_symlink() and _is_job_id(path.name)
    }
    kept = crud.jobs_keeping_results(session, job_ids=folders.keys())
    for job_id, path in folders.items():
        if job_id not in kept:
            _remove(
                path, f"results of job {job_id}, which no longer exists or did not succeed", swept
            )


def _sweep_vanished_rows(session: Session, upload_dir: Path, swept: Swept) -> None:
    """Forget rows whose stored file is gone, unless a queued or running job needs them.

    Only rows under this upload folder are judged (a row under another folder means the setting
    changed, not that the file vanished), and never when not a single stored file is left:
    that is a storage volume that is not mounted, not files that were lost.
    """
    root = upload_dir.resolve()
    if not any(_stored_files(upload_dir)):
        return
    elsewhere = 0
    for blob_id, stored in crud.blob_paths(session):
        path = Path(stored)
        if not path.is_relative_to(root):
            elsewhere += 1
        elif not path.exists() and crud.delete_blob_if_idle(session, blob_id=blob_id):
            swept.rows.append(blob_id)
            log.warning("sweep forgot upload %s: its stored file %s is gone", blob_id, path)
    if elsewhere:
        log.warning("sweep left %d row(s) whose file is outside %s alone", elsewhere, root)


def sweep_orphans(
    *,
    session: Session,
    upload_dir: Path,
    cache_dir: Path,
    artifact_dir: Path,
    min_age_s: float = 0.0,
) -> Swept:
    """Remove every kind of orphan listed in the module docstring; return (and log) what went.
    Files that only their age shows to be abandoned go when older than ``min_age_s``."""
    swept = Swept()
    if upload_dir.is_dir():  # first: its guard looks at the stored files as they were
        _sweep_vanished_rows(session, upload_dir, swept)
    _sweep_uploads(session, upload_dir, cache_dir, min_age_s=min_age_s, swept=swept)
    if artifact_dir.is_dir():
        _sweep_staging(session, artifact_dir, swept)
        _sweep_artifacts(session, artifact_dir, swept)
    if swept:
        log.info(
            "sweep removed %d orphan(s) and forgot %d upload(s) whose file was gone",
            len(swept.paths),
            len(swept.rows),
        )
    return swept


def periodic_grace_s(settings: Settings) -> float:
    """The age under which a periodic sweep leaves a file alone: :data:`PERIODIC_GRACE_S`, or
    an upload's longest check plus its row's insert when that is longer."""
    return max(PERIODIC_GRACE_S, settings.validate_timeout_s + _AFTER_CHECK_S)


def sweep_settings(settings: Settings, sessionmaker: Sessions, *, min_age_s: float = 0.0) -> Swept:
    """:func:`sweep_orphans` over the folders of ``settings`` in a session of its own."""
    with sessionmaker() as session:
        return sweep_orphans(
            session=session,
            upload_dir=settings.upload_dir,
            cache_dir=settings.cache_dir,
            artifact_dir=settings.artifact_dir,
            min_age_s=min_age_s,
        )


class PeriodicSweep:
    """:func:`sweep_settings` every ``interval_s`` seconds (default: the settings'
    ``sweep_interval_s``; 0 sweeps never) with the grace ``min_age_s`` (default:
    :func:`periodic_grace_s`), on a daemon thread between :meth:`start` and :meth:`stop`. A
    sweep that fails (a busy database, a folder that cannot be read) is logged and tried again
    at the next interval."""

    def __init__(
        self,
        settings: Settings,
        sessionmaker: Sessions,
        *,
        interval_s: float | None = None,
        min_age_s: float | None = None,
    ) -> None:
        self.settings, self.sessionmaker = settings, sessionmaker
        self.min_age_s = periodic_grace_s(settings) if min_age_s is None else min_age_s
        self.interval_s = settings.sweep_interval_s if interval_s is None else interval_s
        self.sweeps = 0  # sweeps completed, failed ones not counted
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bitplan-sweep", daemon=True)

    def start(self) -> PeriodicSweep:
        if self.interval_s > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(_STOP_WAIT_S)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                sweep_settings(self.settings, self.sessionmaker, min_age_s=self.min_age_s)
            except Exception:  # noqa: BLE001 -- the next interval tries again
                log.warning(
                    "periodic sweep failed; trying again in %.0f s", self.interval_s, exc_info=True
                )
                continue
            self.sweeps += 1


@contextmanager
def sweeping(settings: Settings, sessionmaker: Sessions) -> Iterator[PeriodicSweep]:
    """The API's sweeps: one at start-up without grace (leftovers of a killed process), then
    :class:`PeriodicSweep` until the block ends."""
    sweep_settings(settings, sessionmaker)
    periodic = PeriodicSweep(settings, sessionmaker).start()
    try:
        yield periodic
    finally:
        periodic.stop()
