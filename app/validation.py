"""The API's side of checking uploads: in a child process with limits, a few at a time.

A model is always checked in a child (:mod:`bitplan.app.upload_check`), so whatever loading it
costs is the child's: memory (``BITPLAN_VALIDATE_MEMORY_BYTES`` plus twice the upload's size),
wall-clock time (``BITPLAN_VALIDATE_TIMEOUT_S``) and disk (a scratch folder removed here
whatever happens, the child killed included). The child runs in a process group of its own,
which is killed when the check ends however it ends: past its time, after an answer (a
process it started may outlive it and hold its pipes), or when the client hangs up.

Starlette does not cancel a route whose client disconnects, so the hang-up is watched for
here: beside the child, a task awaits the request's next ASGI message. The body has been read
by then, so that message is ``http.disconnect`` when the client goes and nothing before the
answer is sent otherwise; the check is then stopped and the child killed.

A dataset is parsed in the API process only when that is cheap: parsing JSON lines into
Python objects takes about 34 times the file's bytes (measured: 16 MiB of short records, 537
MiB), so text files over :data:`INLINE_DATASET_BYTES` and safetensors files whose header is
over it go to a child under the same limits, and at most :data:`INLINE_PARSES` parse in the
API process at once.

At most ``BITPLAN_MAX_VALIDATIONS`` children run at once; one more upload is answered 503 with
``Retry-After`` (``BITPLAN_VALIDATE_RETRY_AFTER_S``) rather than queued, because a queued upload
holds its client's connection and its file. A model upload is refused that way before its body
is read when every slot is taken.

Every refusal is a 422 naming the client's file and the limit it hit, never a server path. A
check the server cannot run (no process or scratch folder can be made: its disk or process
table is full) is the server's problem, not the file's: a 503 with the same ``Retry-After``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from subprocess import DEVNULL, PIPE
from typing import Any

import anyio
import anyio.to_thread
from anyio.abc import ByteReceiveStream, Process
from starlette.requests import ClientDisconnect, Request

from bitplan.app.problems import ProblemError
from bitplan.app.redact import path_names, redact
from bitplan.app.settings import Settings
from bitplan.app.upload_check import DATASET_SUFFIXES, check_dataset
from bitplan.app.uploads import VALIDATE_PREFIX, StoredUpload
from bitplan.sensitivity.errors import InputError

__all__ = [
    "CHILD_MODULE",
    "INLINE_DATASET_BYTES",
    "INLINE_PARSES",
    "ValidationSlots",
    "validate_dataset",
    "validate_model",
    "validation_slots",
]

log = logging.getLogger(__name__)

# What each check runs: ``python -m CHILD_MODULE`` (tests point it at a fast stand-in).
CHILD_MODULE = "bitplan.app.upload_check"
# Datasets parsed in the API process: at most this many bytes (~34 MiB of Python objects at
# the measured 34x), so a burst of small uploads stays cheap and a big one goes to a child.
INLINE_DATASET_BYTES = 1 << 20
# Datasets parsed in the API process at once: ~34 MiB of objects each, so a burst of small
# uploads holds at most ~140 MiB; more wait their turn, briefly (measured: check_dataset on a
# 1 MiB JSON-lines file of 31775 short records takes about 65 ms).
INLINE_PARSES = 4
# Measured: a 158 MiB safetensors BERT needed 0.5-1x its size beyond the fixed cost of torch
# and transformers (which BITPLAN_VALIDATE_MEMORY_BYTES covers), since safetensors maps the
# file copy-on-write; twice leaves room for a zip whose weights expand and for a conversion.
_MEMORY_PER_UPLOAD_BYTE = 2
# The child's answer is one short JSON line; a longer one is not an answer.
_MAX_ANSWER_BYTES = 64 * 1024
# The end of the child's stderr kept for the log when it fails (its traceback, its last words).
_STDERR_TAIL_BYTES = 16 * 1024
# How often the child's own exit is looked for. Process.wait() is not used for that: on some
# Python and anyio versions it also waits for the child's pipes to close, which a process the
# child started may hold open long after. A check takes a second or more (a fresh
# interpreter), so 50 ms adds little.
_EXIT_POLL_S = 0.05
# How long the pipes are still read once the child has exited: what it wrote is in them
# already (microseconds to read; a second allows for a busy event loop), and only a process
# it left behind holding them open makes the read last that long.
_DRAIN_S = 1.0
# The child loads on one thread: a check computes little, and per-thread buffers (OpenBLAS,
# OpenMP) would otherwise make its memory depend on the machine's core count.
_CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",  # a model is read from its files, never fetched
    "CUDA_VISIBLE_DEVICES": "",  # a check runs on the CPU; no GPU context to set up
}
_MEMORY_SETTING = "BITPLAN_VALIDATE_MEMORY_BYTES"
_TIMEOUT_SETTING = "BITPLAN_VALIDATE_TIMEOUT_S"


def _retry_later(settings: Settings, why: str) -> ProblemError:
    """A 503 saying ``why`` an upload cannot be checked now and when to come back."""
    wait = settings.validate_retry_after_s
    return ProblemError(
        503, f"{why}; retry after {wait} s", slug="busy", headers={"Retry-After": str(wait)}
    )


class ValidationSlots:
    """How many checks run in children now, out of ``total``, and the limit on datasets parsed
    in the API process at once (``inline``: those wait for their turn instead of a 503). Used
    from the event loop only (no lock: nothing awaits between looking and taking)."""

    def __init__(self, total: int, *, inline: int = INLINE_PARSES) -> None:
        self.total = total
        self.busy = 0
        self.inline = anyio.Semaphore(inline)

    @property
    def full(self) -> bool:
        return self.busy >= self.total

    def refusal(self, settings: Settings) -> ProblemError:
        """The 503 for an upload that finds every slot taken."""
        return _retry_later(
            settings,
            f"{self.total} uploads are being checked already (BITPLAN_MAX_VALIDATIONS)",
        )

    @contextmanager
    def hold(self, settings: Settings) -> Iterator[None]:
        """Take a slot for the block, or raise :meth:`refusal` when none is free."""
        if self.full:
            raise self.refusal(settings)
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1


def validation_slots(state: Any, settings: Settings) -> ValidationSlots:
    """The slots of one app, kept on its ``app.state`` (made on first use)."""
    slots: ValidationSlots | None = getattr(state, "validation_slots", None)
    if slots is None:
        slots = ValidationSlots(settings.max_validations)
        state.validation_slots = slots
    return slots


@dataclass(frozen=True)
class _Exit:
    """How a child ended: its answer (None when it gave none), its exit status (negative: the
    signal that killed it), whether it ran out of time, and the end of its stderr."""

    answer: dict[str, Any] | None
    returncode: int | None
    timed_out: bool
    stderr_tail: bytes


def _size(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


async def _read_answer(stream: ByteReceiveStream, sink: bytearray) -> None:
    """Collect the child's stdout, at most :data:`_MAX_ANSWER_BYTES` of it (then stop
    keeping, but keep reading so the child never blocks on a full pipe)."""
    async for chunk in stream:
        if len(sink) <= _MAX_ANSWER_BYTES:
            sink += chunk


async def _read_tail(stream: ByteReceiveStream, sink: bytearray) -> None:
    """Keep the last :data:`_STDERR_TAIL_BYTES` of the child's stderr."""
    async for chunk in stream:
        sink += chunk
        del sink[:-_STDERR_TAIL_BYTES]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the child and everything it started have ended


def _parse_answer(raw: bytes) -> dict[str, Any] | None:
    try:
        answer = json.loads(raw) if len(raw) <= _MAX_ANSWER_BYTES else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return answer if isinstance(answer, dict) and "outcome" in answer else None


async def _start(command: list[str], *, cwd: Path, settings: Settings) -> Process:
    """Start ``command`` in a process group of its own; a 503 when the server cannot."""
    try:
        return await anyio.open_process(
            command,
            stdin=DEVNULL,
            stdout=PIPE,
            stderr=PIPE,
            cwd=cwd,
            env={**os.environ, **_CHILD_ENV, "TMPDIR": str(cwd), "HF_HOME": str(cwd / "hf")},
            start_new_session=True,  # its own group: a kill reaches whatever it started
        )
    except OSError as exc:  # fork or exec failed: the server is short of something
        log.error("could not start an upload check: %s", exc)
        raise _retry_later(settings, "the server cannot start an upload check now") from None


async def _communicate(process: Process, answer: bytearray, tail: bytearray) -> None:
    """Read the child's stdout and stderr until it exits, then for at most :data:`_DRAIN_S`."""
    assert process.stdout is not None and process.stderr is not None
    async with anyio.create_task_group() as readers:
        readers.start_soon(_read_answer, process.stdout, answer)
        readers.start_soon(_read_tail, process.stderr, tail)
        while process.returncode is None:  # see _EXIT_POLL_S for why not process.wait()
            await anyio.sleep(_EXIT_POLL_S)
        readers.cancel_scope.deadline = anyio.current_time() + _DRAIN_S


async def _until_hang_up(request: Request) -> None:
    """Return when the client of ``request`` disconnects. Its body has been read: the server
    answers ``receive()`` with ``http.disconnect`` when the client goes, and before that only
    once the response is sent (ASGI), which cannot happen while the check runs."""
    while (await request.receive())["type"] != "http.disconnect":
        # Not expected after the body; a server that sends it anyway must not spin the loop.
        await anyio.sleep(_EXIT_POLL_S)


async def _watch_client(request: Request, check: anyio.CancelScope, hung_up: anyio.Event) -> None:
    await _until_hang_up(request)
    hung_up.set()
    check.cancel()


async def _run_child(
    command: list[str],
    *,
    cwd: Path,
    settings: Settings,
    request: Request | None,
) -> _Exit:
    """Run ``command`` in its own process group until it exits, its time is up or the client
    of ``request`` hangs up (then :class:`ClientDisconnect`); the group is killed in every case."""
    process = await _start(command, cwd=cwd, settings=settings)
    answer, tail = bytearray(), bytearray()
    hung_up = anyio.Event()
    try:
        with anyio.move_on_after(settings.validate_timeout_s) as deadline:
            async with anyio.create_task_group() as group:
                if request is not None:
                    group.start_soon(_watch_client, request, group.cancel_scope, hung_up)
                await _communicate(process, answer, tail)
                group.cancel_scope.cancel()  # the check is over: stop watching the client
    finally:
        # Always, even after an answer: the child's exit says nothing of what it started.
        _kill_group(process.pid)
        with anyio.CancelScope(shield=True):
            await process.aclose()
    if hung_up.is_set():
        raise ClientDisconnect
    parsed = _parse_answer(bytes(answer))
    return _Exit(
        answer=parsed,
        returncode=process.returncode,
        timed_out=deadline.cancelled_caught and parsed is None,  # an answer at the bell counts
        stderr_tail=bytes(tail),
    )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time or unknown signal
        return str(number)


def _refusal(exit_: _Exit, *, filename: str, memory_bytes: int, settings: Settings) -> str | None:
    """The 422 detail for a child that did not find the file valid, or None when it did."""
    memory = (
        f"its {_size(memory_bytes)} memory limit ({_MEMORY_SETTING} plus twice the upload's size)"
    )
    if exit_.timed_out:
        return (
            f"{filename}: checking it took longer than its {settings.validate_timeout_s:g} s "
            f"limit ({_TIMEOUT_SETTING})"
        )
    answer = exit_.answer
    if answer is None:
        code = exit_.returncode or 0
        how = f"signal {_signal_name(-code)}" if code < 0 else f"exit status {code}"
        return (
            f"{filename}: its check stopped without an answer ({how}); loading it may need "
            f"more than {memory}"
        )
    outcome = answer["outcome"]
    if outcome == "valid":
        return None
    if outcome == "out-of-memory":
        return f"{filename}: checking it ran out of {memory}"
    if outcome == "invalid":
        return str(answer.get("detail", ""))
    return f"{filename} cannot be loaded ({answer.get('error', 'unknown error')})"


def _make_scratch(settings: Settings) -> Path:
    """A fresh scratch folder for one check; a 503 when the server cannot make one (its disk
    is full or read-only): that is no fault of the file."""
    try:
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=VALIDATE_PREFIX, dir=settings.cache_dir)).resolve()
    except OSError as exc:
        log.error("could not make a scratch folder for an upload check: %s", exc)
        raise _retry_later(settings, "the server cannot make room to check an upload now") from None


async def _check_in_child(
    stored: StoredUpload,
    *,
    kind: str,
    settings: Settings,
    slots: ValidationSlots,
    request: Request | None,
) -> None:
    """Check ``stored`` in a child under the limits; raise :class:`InputError` (422) when it
    is refused, :class:`ProblemError` (503) when no slot is free or the server cannot run the
    check, :class:`ClientDisconnect` when the client of ``request`` hung up meanwhile."""
    with slots.hold(settings):
        path = stored.path.resolve()  # the child runs in its scratch folder
        memory_bytes = settings.validate_memory_bytes + _MEMORY_PER_UPLOAD_BYTE * stored.size_bytes
        scratch = _make_scratch(settings)
        command = [
            sys.executable,
            "-m",
            CHILD_MODULE,
            f"--parent={os.getpid()}",
            f"--kind={kind}",
            f"--filename={stored.filename.replace(chr(0), '')}",  # argv cannot hold NUL
            f"--memory-bytes={memory_bytes}",
            f"--scratch={scratch}",
            *(["--trusted"] if settings.trusted_models else []),
            str(path),
        ]
        try:
            exit_ = await _run_child(command, cwd=scratch, settings=settings, request=request)
        except ClientDisconnect:
            log.info("%s %s: its client hung up; its check was stopped", kind, stored.filename)
            raise
        finally:
            with anyio.CancelScope(shield=True):  # removed even when the client hung up
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(scratch, ignore_errors=True))
    peak = (exit_.answer or {}).get("peak_rss_bytes", 0)
    detail = _refusal(exit_, filename=stored.filename, memory_bytes=memory_bytes, settings=settings)
    if detail is None:
        summary = (exit_.answer or {}).get("summary", "")
        log.info("%s %s is valid: %s (peak RSS %s)", kind, stored.filename, summary, _size(peak))
        return
    level = logging.INFO if exit_.answer is not None else logging.WARNING
    log.log(level, "%s %s refused: %s", kind, stored.filename, detail)
    if exit_.answer is None or exit_.answer.get("outcome") == "failed":
        log.log(level, "end of its check's stderr:\n%s", exit_.stderr_tail.decode(errors="replace"))
    names = {
        **path_names(path, stored.filename),
        **path_names(scratch, stored.filename),
        path.name: stored.filename,  # the stored name (its sha256) is the server's too
    }
    raise InputError(redact(detail, names))


async def validate_model(
    stored: StoredUpload,
    settings: Settings,
    slots: ValidationSlots,
    request: Request | None = None,
) -> None:
    """Raise :class:`InputError` when ``stored`` is not a loadable model (checked in a child,
    stopped when the client of ``request`` hangs up)."""
    await _check_in_child(stored, kind="model", settings=settings, slots=slots, request=request)


def _parsed_bytes(path: Path, filename: str) -> int:
    """What checking a dataset parses: a text file whole, a safetensors file its header (a
    header length past the file's end is refused before anything is parsed), a file of any
    other type nothing (it is refused by its name)."""
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix not in DATASET_SUFFIXES:
        return 0
    size = path.stat().st_size
    if suffix != ".safetensors":
        return size
    with path.open("rb") as stream:
        prefix = stream.read(8)
    return min(int.from_bytes(prefix, "little"), size) if len(prefix) == 8 else 0


async def validate_dataset(
    stored: StoredUpload,
    settings: Settings,
    slots: ValidationSlots,
    request: Request | None = None,
) -> None:
    """Raise :class:`InputError` unless ``stored`` is a readable dataset; a large one is
    parsed in a child, a small one here, a few at a time (see the module docstring)."""
    parsed = await anyio.to_thread.run_sync(_parsed_bytes, stored.path, stored.filename)
    if parsed > INLINE_DATASET_BYTES:
        await _check_in_child(
            stored, kind="dataset", settings=settings, slots=slots, request=request
        )
        return
    async with slots.inline:
        summary = await anyio.to_thread.run_sync(
            lambda: check_dataset(stored.path, filename=stored.filename)
        )
    log.info("dataset %s is valid: %s", stored.filename, summary)
