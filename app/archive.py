"""Reproducible zips and file hashes, shared by the client and the worker.

A client zips a model folder before uploading it, and finds an earlier upload of the same folder
by the zip's sha256; a worker zips an exported model folder (``GET
/v1/jobs/{id}/plans/{plan_id}/model``) and serves it with its sha256 as the ETag. Both need the
same files to give the same bytes: sorted names, fixed timestamps and modes (the approach of
reproducible-builds.org's "Archive metadata"). Standard library only, so the CLI stays light.
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

__all__ = ["file_sha256", "zip_folder"]

# Every entry gets this timestamp (the earliest a zip can hold), so zipping the same folder
# twice gives the same bytes, hence the same sha256.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_ZIP_FILE_MODE = 0o644 << 16  # rw-r--r--, in the high bits of external_attr as unzip reads them
_CHUNK = 1 << 20  # bytes read at a time when hashing or zipping a file


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read a chunk at a time (the server's content address)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def zip_folder(folder: Path, dest: Path, *, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """Zip ``folder``'s files into ``dest`` reproducibly: the same files give the same bytes
    (sorted names, fixed timestamps and modes). ``compression`` is a :mod:`zipfile` method:
    ``ZIP_STORED`` for files that hardly compress (packed weights), which also keeps the zip's
    size the files' sizes plus headers."""
    with zipfile.ZipFile(dest, "w", compression) as zipped:
        for item in sorted(folder.rglob("*")):
            if not item.is_file():
                continue
            info = zipfile.ZipInfo(item.relative_to(folder).as_posix(), date_time=_ZIP_EPOCH)
            info.compress_type = compression
            info.external_attr = _ZIP_FILE_MODE
            info.file_size = item.stat().st_size  # lets zipfile choose zip64 for large files
            with item.open("rb") as src, zipped.open(info, "w") as out:
                shutil.copyfileobj(src, out, _CHUNK)
    return dest
