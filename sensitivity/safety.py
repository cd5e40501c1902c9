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
import json
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
    "UNZIP_PREFIX",
    "check_finite",
    "extract_zip",
    "file_sha256",
    "files_sha256",
    "max_unzip_bytes",
    "read_safetensors_header",
]

logger = logging.getLogger(__name__)

# 4 GiB: a 2B-parameter fp16 checkpoint fits; anything larger must be raised explicitly.
DEFAULT_MAX_UNZIP_BYTES = 4 << 30
# The prefix of extract_zip's work folders: the service's sweeper recognises leftovers by it.
UNZIP_PREFIX = ".unzip-"
# Zip members are copied and hashed in 1 MiB chunks so memory stays flat for any file size.
_CHUNK = 1 << 20
_ENV_MAX_UNZIP = "BITPLAN_MAX_UNZIP_BYTES"
# Free space kept on the cache's disk after an extraction, so one upload cannot fill it.
_DISK_RESERVE = 256 << 20
# safetensors refuses headers over 100 MB itself; a header is JSON of names, dtypes and shapes.
_MAX_HEADER = 100_000_000
# Bytes per element of each safetensors dtype (the format's own list).
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
    "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip


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
        raise InputError(f"{path.name} is not a readable zip archive ({exc})") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=UNZIP_PREFIX, dir=dest.parent))
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
            _check_disk(work, declared, label=path.name)
            _copy_members(archive, members, work, limit=limit, label=path.name)
        try:
            os.replace(work, dest)
        except OSError:
            if not dest.is_dir():
                raise
            shutil.rmtree(work)  # a concurrent extraction of the same archive won the race
    except zipfile.BadZipFile as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise InputError(f"{path.name} is a corrupt zip archive ({exc})") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    logger.info("extracted %s into %s", path.name, dest)
    return dest


def _check_disk(work: Path, declared: int, *, label: str) -> None:
    """Refuse an archive whose declared size would leave less than the reserve free on disk
    (the copy also stops when real bytes exceed the declared ones, so the count holds)."""
    free = shutil.disk_usage(work).free
    if declared > free - _DISK_RESERVE:
        raise InputError(
            f"refusing zip {label}: it expands to {declared} bytes but the server has "
            f"{max(free - _DISK_RESERVE, 0)} bytes of disk to spare"
        )


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


def _header_problem(raw: bytes, data_bytes: int) -> tuple[str | None, dict[str, tuple[int, ...]]]:
    """Why a safetensors header is malformed (or None), and its tensors' shapes."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return "its header is not UTF-8 JSON", {}
    if not isinstance(header, dict):
        return "its header is not a JSON object", {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            return f"tensor {name!r} has no description", {}
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _DTYPE_BYTES:
            return f"tensor {name!r} has an unknown dtype {dtype!r}", {}
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            return f"tensor {name!r} has an invalid shape", {}
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes
        ):
            return f"tensor {name!r} has data offsets outside the file", {}
        numel = 1
        for dim in shape:
            numel *= dim
        if offsets[1] - offsets[0] != numel * _DTYPE_BYTES[dtype]:
            return f"tensor {name!r} has {offsets[1] - offsets[0]} bytes for shape {shape}", {}
        shapes[name] = tuple(shape)
    return None, shapes


def read_safetensors_header(path: Path, *, label: str) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a safetensors file declares, read from its header alone (no tensor
    is loaded). Any inconsistency with the file's size is an :class:`InputError` naming
    ``label``, so a malformed file is refused before a loader trips over it."""
    size = path.stat().st_size
    with path.open("rb") as stream:
        prefix = stream.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if length < 2 or length > min(_MAX_HEADER, size - 8):
            problem: str | None = "its header length does not fit the file"
            shapes: dict[str, tuple[int, ...]] = {}
        else:
            problem, shapes = _header_problem(stream.read(length), size - 8 - length)
    if problem is not None:
        raise InputError(f"{label}: {path.name} is not a valid safetensors file ({problem})")
    return shapes
