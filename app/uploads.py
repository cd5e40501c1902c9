"""Streaming uploads: multipart to disk in chunks, a byte limit, sha256 content addressing.

A model can be gigabytes, so the request body is never held in memory nor spooled twice: the
multipart parser (python-multipart, driven chunk by chunk from the ASGI stream) hands the
``file`` part's bytes straight to a temporary file in the destination folder while a running
count and a sha256 are kept. Past ``max_bytes`` the upload stops at once with 413 and the
partial file is deleted. A complete file is renamed atomically to ``<sha256><suffix>``, so
readers never see half a file and equal bytes land on the same path.

A body whose multipart framing is wrong is a 422 that names what is wrong (RFC 2046 §5.1.1,
RFC 7578): no or an overlong boundary parameter, a first boundary other than the declared one,
a part header line not ended by CRLF, a part header over :data:`MAX_PART_HEADER_BYTES` or more
than :data:`MAX_PART_HEADERS` of them, a body that ends before its closing boundary. Bytes
before the first boundary (a preamble) are refused too, although RFC 2046 §5.1.1 says a
preamble is to be ignored: that is python-multipart's behaviour (it skips blank lines before
the first boundary, nothing else, and has no option to skip more). The header limits are
checked here as the headers arrive (python-multipart's own, where it has them, are at or just
above them), so at most one chunk beyond them is ever held.

What a stored file must be, and how that is checked without risking the API process, is
:mod:`bitplan.app.upload_check` and :mod:`bitplan.app.validation`.

File names are UTF-8 as browsers and httpx send them (latin-1 for a name that is not UTF-8).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO

import anyio
from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from bitplan.app.problems import ProblemError
from bitplan.sensitivity.errors import InputError

__all__ = [
    "MAX_PART_HEADERS",
    "MAX_PART_HEADER_BYTES",
    "PART_PREFIX",
    "UPLOAD_FIELD",
    "VALIDATE_PREFIX",
    "StoredUpload",
    "receive_upload",
]

log = logging.getLogger(__name__)

UPLOAD_FIELD = "file"
# Temporary names the sweeper (bitplan.app.sweeper) recognises as leftovers of a killed process.
PART_PREFIX = ".upload-"
VALIDATE_PREFIX = ".validate-"
# Multipart framing around the file (boundaries, part headers) is a few hundred bytes; a body
# larger than the limit plus this slack cannot hold an acceptable file, so it is refused early.
_FRAMING_SLACK = 16 * 1024
_SUFFIX_RE = re.compile(r"^\.[a-z0-9]{1,16}$")
# A part needs Content-Disposition and perhaps Content-Type (RFC 7578 §4.2-4.4), each well
# under a kilobyte even with a 255-character UTF-8 file name: these bound what one request
# makes us hold before its file starts, and match python-multipart's own defaults.
MAX_PART_HEADER_BYTES = 4096
MAX_PART_HEADERS = 8
# RFC 2046 §5.1.1: a boundary is 1 to 70 characters.
_MAX_BOUNDARY = 70
# The start of the body kept to say what is wrong before its first boundary.
_HEAD_BYTES = 256
# python-multipart's messages for a malformed part header, and what each means for the client
# (its two limits, where it has them, are at or just above ours). Other messages are quoted.
_HEADER_PROBLEMS = (
    ("Maximum header count exceeded", f"a part has more than {MAX_PART_HEADERS} headers"),
    ("Maximum header size exceeded", f"a part header is longer than {MAX_PART_HEADER_BYTES} bytes"),
    ("Did not find LF character at end of header", "a part header line ends with a CR not "
     "followed by LF (header lines end with CRLF)"),
    ("Did not find LF at end of headers", "a part's headers do not end with an empty CRLF line"),
    ("Found invalid character", "a part header name holds a character a header name cannot "
     "have (a space, a CR or LF, a control character)"),
    ("Found 0-length header", "a part header has an empty name"),
)  # fmt: skip


@dataclass(frozen=True)
class StoredUpload:
    """A received file: where it lies, its content address and the client's file name."""

    path: Path
    sha256: str
    size_bytes: int
    filename: str


class _TooLarge(Exception):
    pass


class _Framing(Exception):
    """A framing problem found by :class:`_FilePartWriter` itself (its message names it)."""


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


def _malformed(what: str) -> InputError:
    return InputError(f"malformed multipart body: {what}")


class _FilePartWriter:
    """python-multipart callbacks that write the first ``file`` part to ``sink``, bound every
    part's headers, and note how far the body got (``phase``) to explain a parser error."""

    def __init__(self, sink: IO[bytes], max_bytes: int) -> None:
        self.sink = sink
        self.max_bytes = max_bytes
        self.digest = hashlib.sha256()
        self.size = 0
        self.filename: str | None = None
        self.ended = False
        # "preamble" until the first boundary, then "headers" / "data" for each part.
        self.phase = "preamble"
        self._headers: dict[str, bytes] = {}
        self._header_count = 0
        self._field = b""
        self._value = b""
        self._writing = False

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_begin": self._header_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self.phase = "headers"
        self._headers = {}
        self._header_count = 0

    def _header_begin(self) -> None:
        self._header_count += 1
        if self._header_count > MAX_PART_HEADERS:
            raise _Framing(f"a part has more than {MAX_PART_HEADERS} headers")

    def _check_header_size(self) -> None:
        if len(self._field) + len(self._value) > MAX_PART_HEADER_BYTES:
            raise _Framing(f"a part header is longer than {MAX_PART_HEADER_BYTES} bytes")

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]
        self._check_header_size()

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]
        self._check_header_size()

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").lower()
        self._headers[name] = self._value  # raw bytes: decoding happens once, below
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        self.phase = "data"
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


def _flush_to_disk(sink: IO[bytes]) -> None:
    sink.flush()
    os.fsync(sink.fileno())


def _decode_filename(raw: bytes) -> str:
    """UTF-8, as clients send it; a name that is not UTF-8 is read as latin-1 (old clients)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise ProblemError(
            415,
            f"send the file as multipart/form-data in a field named {UPLOAD_FIELD!r}",
            slug="unsupported-media-type",
        )
    boundary = options.get(b"boundary", b"")
    if not boundary:
        raise _malformed("the Content-Type multipart/form-data has no boundary parameter")
    if len(boundary) > _MAX_BOUNDARY:
        raise _malformed(f"the boundary is longer than {_MAX_BOUNDARY} characters (RFC 2046)")
    return boundary


def _parse_problem(
    exc: MultipartParseError, writer: _FilePartWriter, head: bytes, boundary: str
) -> str:
    """What a parser error means, from how far the body got."""
    if writer.phase == "preamble":
        start = head.lstrip(b"\r\n")  # the parser skips blank lines before the first boundary
        delimiter = f"--{boundary}".encode("latin-1")
        if not start.startswith(b"--"):
            return f"bytes before the first boundary; the body must start with --{boundary}"
        if not start.startswith(delimiter):
            return (
                f"the body's first boundary is not the one its Content-Type declares (--{boundary})"
            )
        return "the first boundary line does not end with CRLF"
    message = str(exc)
    if writer.phase == "headers":
        for prefix, problem in _HEADER_PROBLEMS:
            if message.startswith(prefix):
                return problem
        return f"a part's headers are malformed ({message})"
    return f"a boundary line after a part is malformed ({message})"


def _incomplete_problem(writer: _FilePartWriter, boundary: str) -> str:
    """What is wrong with a body that ended without its closing boundary."""
    if writer.phase == "preamble":
        return f"the body holds no part; it must start with the boundary line --{boundary}"
    return f"the body ended before its closing boundary --{boundary}--"


async def receive_upload(request: Request, *, dest_dir: Path, max_bytes: int) -> StoredUpload:
    """Stream the request's ``file`` part to ``dest_dir/<sha256><suffix>``; 413 past the limit,
    422 naming the problem for a malformed body."""
    boundary = _boundary(request)
    shown = boundary.decode("latin-1")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + _FRAMING_SLACK:
        raise _too_large(max_bytes)
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=dest_dir, prefix=PART_PREFIX, suffix=".part", delete=False
    ) as sink:
        tmp = Path(sink.name)
        head = b""
        writer = _FilePartWriter(sink, max_bytes)
        try:
            parser = MultipartParser(boundary, writer.callbacks())  # type: ignore[arg-type]
            async for chunk in request.stream():
                if len(head) < _HEAD_BYTES:
                    head += chunk[: _HEAD_BYTES - len(head)]
                # Hashing and disk writes leave the event loop so other requests keep flowing.
                await anyio.to_thread.run_sync(parser.write, chunk)
            parser.finalize()
            if not writer.ended:
                raise _Framing(_incomplete_problem(writer, shown))
            # The bytes are on disk before the name says they are whole; off the event loop,
            # since syncing a large file takes seconds.
            await anyio.to_thread.run_sync(_flush_to_disk, sink)
        except _TooLarge:
            tmp.unlink(missing_ok=True)
            log.info("refused an upload over %d bytes", max_bytes)
            raise _too_large(max_bytes) from None
        except _Framing as exc:
            tmp.unlink(missing_ok=True)
            raise _malformed(str(exc)) from None
        except MultipartParseError as exc:
            tmp.unlink(missing_ok=True)
            raise _malformed(_parse_problem(exc, writer, head, shown)) from None
        except ProblemError:
            tmp.unlink(missing_ok=True)
            raise
        except Exception as exc:  # any other parser error on a hostile body
            tmp.unlink(missing_ok=True)
            raise _malformed(type(exc).__name__) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    if writer.filename is None:
        tmp.unlink(missing_ok=True)
        raise InputError(
            f"no file in the request; send it as multipart field {UPLOAD_FIELD!r} with a filename"
        )
    if writer.size == 0:
        tmp.unlink(missing_ok=True)
        raise InputError(f"the uploaded file {writer.filename!r} is empty")
    sha256 = writer.digest.hexdigest()
    final = dest_dir / f"{sha256}{_suffix(writer.filename)}"
    os.replace(tmp, final)  # atomic on one file system: readers see all or nothing
    log.info("stored upload %s (%d bytes) as %s", writer.filename, writer.size, final.name)
    return StoredUpload(path=final, sha256=sha256, size_bytes=writer.size, filename=writer.filename)
