"""Remove what a killed or failed process left on disk: partial uploads, extraction folders and
stored files that no row records.

Uploads are written as ``.upload-*.part``, renamed to their content address, then recorded in a
row; validation extracts zips under ``.validate-*`` and the model loader under
``unzipped/.unzip-*``. A process killed between those steps (SIGKILL, OOM, a power cut) leaves
the intermediate on disk forever, so :func:`sweep_orphans` runs at API start-up and may be
called periodically. ``min_age_s`` protects work in flight: at start-up no upload of this
process is running, so 0 is safe when one API process owns the upload folder; a periodic sweep,
or several API processes sharing one folder, should pass a grace longer than any upload.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy.orm import Session

from bitplan.app import crud
from bitplan.app.settings import Settings
from bitplan.app.uploads import PART_PREFIX, VALIDATE_PREFIX
from bitplan.sensitivity.safety import UNZIP_PREFIX

__all__ = ["PERIODIC_GRACE_S", "sweep_orphans", "sweep_settings"]

log = logging.getLogger(__name__)

# A periodic sweep spares anything younger than an hour: longer than any upload plus validation.
PERIODIC_GRACE_S = 3600.0
_KINDS = ("models", "datasets")


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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep_orphans(
    *, session: Session, upload_dir: Path, cache_dir: Path, min_age_s: float = 0.0
) -> list[Path]:
    """Remove leftovers and row-less stored files older than ``min_age_s``; return (and log)
    what was removed."""
    now = time.time()
    cutoff = now - min_age_s
    # A worker's extraction in flight is never this API's to judge: it gets the periodic grace.
    others_cutoff = now - max(min_age_s, PERIODIC_GRACE_S)
    removed: list[Path] = []
    for path, own in _leftovers(upload_dir, cache_dir):
        if _old(path, cutoff=cutoff if own else others_cutoff):
            _remove(path)
            removed.append(path)
    for path in _stored_files(upload_dir):
        if not _old(path, cutoff=cutoff):  # the cheap check first: a query a file otherwise
            continue
        if not crud.blob_path_in_use(session, path=str(path.resolve())):
            _remove(path)
            removed.append(path)
    for path in removed:
        log.info("sweep removed orphan %s", path)
    log.info("sweep removed %d orphan(s)", len(removed))
    return removed


def sweep_settings(
    settings: Settings, sessionmaker: Callable[[], Session], *, min_age_s: float = 0.0
) -> list[Path]:
    """:func:`sweep_orphans` over the folders of ``settings`` in a session of its own."""
    with sessionmaker() as session:
        return sweep_orphans(
            session=session,
            upload_dir=settings.upload_dir,
            cache_dir=settings.cache_dir,
            min_age_s=min_age_s,
        )
