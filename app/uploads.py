"""Streaming uploads: multipart to disk in chunks, a byte limit, sha256 content addressing.

A model can be gigabytes, so the request body is never held in memory nor spooled twice: the
multipart parser (python-multipart, driven chunk by chunk from the ASGI stream) hands the
``file`` part's bytes straight to a temporary file in the destination folder while a running
count and a sha256 are kept. Past ``max_bytes`` the upload stops at once with 413 and the
partial file is deleted. A complete file is renamed atomically to ``<sha256><suffix>``, so
readers never see half a file and equal bytes land on the same path.

Validation happens before a resource is recorded: a model must load with
:func:`bitplan.sensitivity.models.load_model` (its message is the 422 detail); a dataset must be a
non-empty ``.txt``, ``.jsonl`` or ``.safetensors`` file that reads as that format. A zipped model
is extracted into a private folder that is removed whatever the outcome, so a refused upload
leaves nothing on disk. Messages name the client's file, never a server path, and any failure of
a hostile file (not only :class:`InputError`) is a 422, never a 500.

File names are UTF-8 as browsers and httpx send them (latin-1 for a name that is not UTF-8).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO

import anyio
from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from bitplan.app.problems import ProblemError
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.models import load_model
from bitplan.sensitivity.safety import read_safetensors_header
from bitplan.sensitivity.textdata import read_jsonl, read_txt

__all__ = [
    "DATASET_SUFFIXES",
    "PART_PREFIX",
    "VALIDATE_PREFIX",
    "StoredUpload",
    "receive_upload",
    "validate_dataset",
    "validate_model",
]

log = logging.getLogger(__name__)

DATASET_SUFFIXES = (".txt", ".jsonl", ".safetensors")
UPLOAD_FIELD = "file"
# Temporary names the sweeper (bitplan.app.sweeper) recognises as leftovers of a killed process.
PART_PREFIX = ".upload-"
VALIDATE_PREFIX = ".validate-"
# Multipart framing around the file (boundaries, part headers) is a few hundred bytes; a body
# larger than the limit plus this slack cannot hold an acceptable file, so it is refused early.
_FRAMING_SLACK = 16 * 1024
_SUFFIX_RE = re.compile(r"^\.[a-z0-9]{1,16}$")


@dataclass(frozen=True)
class StoredUpload:
    """A received file: where it lies, its content address and the client's file name."""

    path: Path
    sha256: str
    size_bytes: int
    filename: str


class _TooLarge(Exception):
    pass


def _safe_filename(raw: str) -> str:
    """The base name of a client-supplied file name (no folders, at most 255 characters)."""
    name = PureWindowsPath(PurePosixPath(raw).name).name.strip()
    return name[-255:] or "upload"


def _suffix(filename: str) -> str:
    """The stored suffix: ``.tar.gz``-style double suffixes keep their last part only."""
    suffix = PurePosixPath(filename).suffix.lower()
    return suffix if _SUFFIX_RE.match(suffix) else ""


def _too_large(max_bytes: int) -> ProblemError:
    return ProblemError(
        413,
        f"upload exceeds the limit of {max_bytes} bytes (BITPLAN_MAX_UPLOAD_BYTES)",
        slug="upload-too-large",
        max_bytes=max_bytes,
    )


class _FilePartWriter:
    """python-multipart callbacks that write the first ``file`` part to ``sink``."""

    def __init__(self, sink: IO[bytes], max_bytes: int) -> None:
        self.sink = sink
        self.max_bytes = max_bytes
        self.digest = hashlib.sha256()
        self.size = 0
        self.filename: str | None = None
        self.ended = False
        self._headers: dict[str, bytes] = {}
        self._field = b""
        self._value = b""
        self._writing = False

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").lower()
        self._headers[name] = self._value  # raw bytes: decoding happens once, below
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == UPLOAD_FIELD and self.filename is None and b"filename" in options:
            self.filename = _safe_filename(_decode_filename(options[b"filename"]))
            self._writing = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._writing:
            return
        self.size += end - start
        if self.size > self.max_bytes:
            raise _TooLarge
        chunk = data[start:end]
        self.digest.update(chunk)
        self.sink.write(chunk)

    def _part_end(self) -> None:
        self._writing = False

    def _end(self) -> None:
        self.ended = True


def _decode_filename(raw: bytes) -> str:
    """UTF-8, as clients send it; a name that is not UTF-8 is read as latin-1 (old clients)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise ProblemError(
            415,
            f"send the file as multipart/form-data in a field named {UPLOAD_FIELD!r}",
            slug="unsupported-media-type",
        )
    return options[b"boundary"]


async def receive_upload(request: Request, *, dest_dir: Path, max_bytes: int) -> StoredUpload:
    """Stream the request's ``file`` part to ``dest_dir/<sha256><suffix>``; 413 past the limit."""
    boundary = _boundary(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + _FRAMING_SLACK:
        raise _too_large(max_bytes)
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=dest_dir, prefix=PART_PREFIX, suffix=".part", delete=False
    ) as sink:
        tmp = Path(sink.name)
        try:
            writer = _FilePartWriter(sink, max_bytes)
            parser = MultipartParser(boundary, writer.callbacks())  # type: ignore[arg-type]
            async for chunk in request.stream():
                # Hashing and disk writes leave the event loop so other requests keep flowing.
                await anyio.to_thread.run_sync(parser.write, chunk)
            parser.finalize()
            sink.flush()
            os.fsync(sink.fileno())  # the bytes are on disk before the name says they are whole
        except _TooLarge:
            tmp.unlink(missing_ok=True)
            log.info("refused an upload over %d bytes", max_bytes)
            raise _too_large(max_bytes) from None
        except ProblemError:
            tmp.unlink(missing_ok=True)
            raise
        except Exception as exc:  # the parser's errors for malformed multipart framing
            tmp.unlink(missing_ok=True)
            raise InputError(f"malformed multipart body ({type(exc).__name__})") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    if writer.filename is None or not writer.ended:
        tmp.unlink(missing_ok=True)
        raise InputError(
            f"no complete file in the request; send it as multipart field {UPLOAD_FIELD!r} "
            "with a filename"
        )
    if writer.size == 0:
        tmp.unlink(missing_ok=True)
        raise InputError(f"the uploaded file {writer.filename!r} is empty")
    sha256 = writer.digest.hexdigest()
    final = dest_dir / f"{sha256}{_suffix(writer.filename)}"
    os.replace(tmp, final)  # atomic on one file system: readers see all or nothing
    log.info("stored upload %s (%d bytes) as %s", writer.filename, writer.size, final.name)
    return StoredUpload(path=final, sha256=sha256, size_bytes=writer.size, filename=writer.filename)


def _scrub(message: str, replacements: dict[str, str]) -> str:
    """``message`` with every server path in ``replacements`` swapped for its client name."""
    for server, client in sorted(replacements.items(), key=lambda kv: -len(kv[0])):
        message = message.replace(server, client)
    return message


def validate_model(path: Path, *, filename: str, trusted: bool, cache_dir: Path) -> None:
    """Raise :class:`InputError` when ``path`` is not a loadable model; the message names the
    client's ``filename``, never a server path.

    A zip is extracted into a fresh ``VALIDATE_PREFIX`` folder under ``cache_dir`` that is
    removed in every case (a worker extracts the accepted file again into its own cache).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=VALIDATE_PREFIX, dir=cache_dir))
    names = {str(path): filename, str(scratch): filename, path.name: filename}
    try:
        loaded = load_model(str(path), device="cpu", trusted=trusted, cache_dir=scratch)
    except InputError as exc:
        raise InputError(_scrub(str(exc), names)) from None
    except Exception as exc:  # a hostile file may break a loader anywhere: still the client's fault
        log.warning("model %s failed validation", filename, exc_info=True)
        # Only the error's type: a library's message may hold any server path.
        why = type(exc).__name__
        raise InputError(f"{filename} cannot be loaded as a model ({why})") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("validated model %s: task %s, %d layers", filename, loaded.task, len(loaded.layers))


def validate_dataset(path: Path, *, filename: str) -> None:
    """Raise :class:`InputError` unless ``path`` reads as a ``.txt``/``.jsonl``/``.safetensors``.

    Text is parsed with the loader's own readers (the same messages a job would give); a
    safetensors file has its header read, not its tensors: those are checked against the model
    when a job loads them.
    """
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix not in DATASET_SUFFIXES:
        raise InputError(
            f"unsupported dataset file {filename!r}; accepted: {', '.join(DATASET_SUFFIXES)}"
        )
    shown = Path(filename)  # messages name the client's file, not the stored one
    if suffix == ".txt":
        read_txt(path.read_bytes(), shown)
    elif suffix == ".jsonl":
        read_jsonl(path.read_bytes(), shown, with_labels=True)
    else:
        names = [name for name in read_safetensors_header(path, label=filename) if name != "labels"]
        if not names:
            raise InputError(
                f"{filename} holds no input tensors; name them after the model's "
                "forward arguments (e.g. pixel_values, input_ids)"
            )
