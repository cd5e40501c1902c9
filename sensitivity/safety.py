"""Defences for untrusted model files: safe zip extraction, finite-weight checks, content hashes.

Models arrive from users (CLI paths, REST uploads), so nothing in them is trusted. A zip may
try to write outside its target folder (``../x``, absolute names, symlinks) or expand into far
more bytes than it declares (a "zip bomb"); both are refused before or while extracting, and
an extraction that fails leaves nothing behind. Weights that hold NaN or Inf would turn every
measured error into NaN downstream, so they are refused at load time with the offending name.

References: CWE-22 (path traversal, "Zip Slip"); CWE-409 (decompression bombs).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import torch
from torch import nn

from bitplan.sensitivity.errors import InputError

__all__ = [
    "DEFAULT_MAX_UNZIP_BYTES",
    "check_finite",
    "extract_zip",
    "file_sha256",
    "files_sha256",
    "max_unzip_bytes",
]

logger = logging.getLogger(__name__)

# 4 GiB: a 2B-parameter fp16 checkpoint fits; anything larger must be raised explicitly.
DEFAULT_MAX_UNZIP_BYTES = 4 << 30
# Zip members are copied and hashed in 1 MiB chunks so memory stays flat for any file size.
_CHUNK = 1 << 20
_ENV_MAX_UNZIP = "BITPLAN_MAX_UNZIP_BYTES"


def max_unzip_bytes(value: int | None = None) -> int:
    """The unzip limit: ``value`` if given, else env ``BITPLAN_MAX_UNZIP_BYTES``, else 4 GiB."""
    if value is None:
        raw = os.environ.get(_ENV_MAX_UNZIP)
        if raw is None:
            return DEFAULT_MAX_UNZIP_BYTES
        try:
            value = int(raw)
        except ValueError:
            raise InputError(
                f"{_ENV_MAX_UNZIP}={raw!r} must be an integer number of bytes"
            ) from None
    if value <= 0:
        raise InputError(f"the unzip limit must be a positive number of bytes, got {value}")
    return value


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why ``info`` may not be extracted, or None when it is a plain, contained file or folder."""
    name = info.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (parts and parts[0].endswith(":")):
        return "has an absolute path"
    if ".." in parts:
        return "points outside the archive (..)"
    mode = info.external_attr >> 16  # the Unix mode lives in the high 16 bits
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    kind = stat.S_IFMT(mode)  # 0 when the archiver recorded permissions only
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        return "is not a regular file"
    return None


def extract_zip(path: Path, dest: Path, *, max_bytes: int | None = None) -> Path:
    """Extract the zip at ``path`` into the new folder ``dest`` and return ``dest``.

    Refuses members with absolute or ``..`` paths and symlinks; refuses archives whose declared
    uncompressed size exceeds ``max_bytes`` and stops as soon as the bytes actually written do
    (declared sizes can lie). Extraction happens in a temporary sibling folder that is renamed
    into place only when complete, so ``dest`` is either absent or whole. When ``dest`` already
    exists it is returned as is (extraction is keyed by content, so it is the same archive).
    """
    limit = max_unzip_bytes(max_bytes)
    if dest.is_dir():
        return dest
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{path} is not a readable zip archive ({exc})") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".unzip-", dir=dest.parent))
    try:
        with archive:
            members = archive.infolist()
            for info in members:
                problem = _member_problem(info)
                if problem is not None:
                    raise InputError(
                        f"refusing zip {path.name}: member {info.filename!r} {problem}"
                    )
            declared = sum(info.file_size for info in members)
            if declared > limit:
                raise InputError(
                    f"refusing zip {path.name}: it declares {declared} uncompressed bytes, over "
                    f"the limit of {limit} (raise it with {_ENV_MAX_UNZIP})"
                )
            _copy_members(archive, members, work, limit=limit, label=path.name)
        try:
            os.replace(work, dest)
        except OSError:
            if not dest.is_dir():
                raise
            shutil.rmtree(work)  # a concurrent extraction of the same archive won the race
    except zipfile.BadZipFile as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise InputError(f"{path} is a corrupt zip archive ({exc})") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    logger.info("extracted %s into %s", path, dest)
    return dest


def _copy_members(
    archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], work: Path, *, limit: int, label: str
) -> None:
    """Write ``members`` under ``work``, counting real bytes against ``limit``."""
    written = 0
    for info in members:
        target = work.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        member_bytes = 0
        with archive.open(info) as src, open(target, "wb") as out:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                member_bytes += len(chunk)
                if written > limit or member_bytes > info.file_size:
                    raise InputError(
                        f"refusing zip {label}: member {info.filename!r} expands beyond its "
                        f"declared size or the limit of {limit} bytes (raise it with "
                        f"{_ENV_MAX_UNZIP})"
                    )
                out.write(chunk)


def _hash_file(digest: hashlib._Hash, path: Path) -> None:
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)


def file_sha256(path: Path) -> str:
    """sha256 of one file's bytes, streamed in chunks."""
    digest = hashlib.sha256()
    _hash_file(digest, path)
    return digest.hexdigest()


def files_sha256(paths: Iterable[Path], *, root: Path, salt: str = "") -> str:
    """One sha256 over ``salt`` and the files' names (relative to ``root``) and bytes.

    Names are included so that renaming a shard changes the hash; files are streamed in chunks.
    The caller fixes the order (sort it) so the hash is stable.
    """
    digest = hashlib.sha256(salt.encode())
    for path in paths:
        digest.update(b"\0" + path.relative_to(root).as_posix().encode() + b"\0")
        _hash_file(digest, path)
    return digest.hexdigest()


def check_finite(module: nn.Module, *, label: str) -> None:
    """Raise :class:`InputError` naming the first floating parameter that holds NaN or Inf."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.is_floating_point() and not bool(torch.isfinite(param).all()):
                raise InputError(
                    f"{label}: weight {name} contains NaN or Inf values; the checkpoint is corrupt"
                )
