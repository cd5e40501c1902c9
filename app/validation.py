"""The API's side of checking uploads: in a child process with limits, a few at a time.

A model is always checked in a child (:mod:`bitplan.app.upload_check`), so whatever loading it
costs is the child's: memory (``BITPLAN_VALIDATE_MEMORY_BYTES`` plus twice the upload's size),
wall-clock time (``BITPLAN_VALIDATE_TIMEOUT_S``, then the child's process group is killed) and
disk (a scratch folder removed here whatever happens, the child killed included). The API
awaits the child on its event loop; a client that hangs up gets its child killed.

A dataset is parsed in the API process only when that is cheap: parsing JSON lines into
Python objects takes about 34 times the file's bytes (measured: 16 MiB of short records, 537
MiB), so text files over :data:`INLINE_DATASET_BYTES` and safetensors files whose header is
over it go to a child under the same limits.

At most ``BITPLAN_MAX_VALIDATIONS`` children run at once; one more upload is answered 503 with
``Retry-After`` (``BITPLAN_VALIDATE_RETRY_AFTER_S``) rather than queued, because a queued upload
holds its client's connection and its file. A model upload is refused that way before its body
is read when every slot is taken.

Every refusal is a 422 naming the client's file and the limit it hit, never a server path.
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
from anyio.abc import ByteReceiveStream

from bitplan.app.problems import ProblemError
from bitplan.app.settings import Settings
from bitplan.app.upload_check import DATASET_SUFFIXES, check_dataset
from bitplan.app.uploads import VALIDATE_PREFIX, StoredUpload
from bitplan.sensitivity.errors import InputError

__all__ = [
    "CHILD_MODULE",
    "INLINE_DATASET_BYTES",
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
# Measured: a 158 MiB safetensors BERT needed 0.5-1x its size beyond the fixed cost of torch
# and transformers (which BITPLAN_VALIDATE_MEMORY_BYTES covers), since safetensors maps the
# file copy-on-write; twice leaves room for a zip whose weights expand and for a conversion.
_MEMORY_PER_UPLOAD_BYTE = 2
# The child's answer is one short JSON line; a longer one is not an answer.
_MAX_ANSWER_BYTES = 64 * 1024
# The end of the child's stderr kept for the log when it fails (its traceback, its last words).
_STDERR_TAIL_BYTES = 16 * 1024
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


class ValidationSlots:
    """How many checks run in children now, out of ``total``. Used from the event loop only
    (no lock: nothing awaits between looking and taking)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.busy = 0

    @property
    def full(self) -> bool:
        return self.busy >= self.total

    def refusal(self, settings: Settings) -> ProblemError:
        """The 503 for an upload that finds every slot taken."""
        wait = settings.validate_retry_after_s
        return ProblemError(
            503,
            f"{self.total} uploads are being checked already (BITPLAN_MAX_VALIDATIONS); "
            f"retry after {wait} s",
            slug="busy",
            headers={"Retry-After": str(wait)},
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


def _scrub(message: str, replacements: dict[str, str]) -> str:
    """``message`` with every server path in ``replacements`` swapped for its client name."""
    for server, client in sorted(replacements.items(), key=lambda kv: -len(kv[0])):
        message = message.replace(server, client)
    return message


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
        pass  # it ended on its own meanwhile


def _parse_answer(raw: bytes) -> dict[str, Any] | None:
    try:
        answer = json.loads(raw) if len(raw) <= _MAX_ANSWER_BYTES else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return answer if isinstance(answer, dict) and "outcome" in answer else None


async def _run_child(command: list[str], *, cwd: Path, timeout_s: float) -> _Exit:
    """Run ``command`` in its own process group; kill the group at ``timeout_s`` or when this
    task is cancelled (a client that hung up)."""
    try:
        process = await anyio.open_process(
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
        raise ProblemError(
            503, "the server cannot start an upload check now; retry later", slug="busy"
        ) from None
    answer, tail = bytearray(), bytearray()
    try:
        with anyio.move_on_after(timeout_s) as deadline:
            assert process.stdout is not None and process.stderr is not None
            async with anyio.create_task_group() as group:
                group.start_soon(_read_answer, process.stdout, answer)
                group.start_soon(_read_tail, process.stderr, tail)
            await process.wait()
    finally:
        if process.returncode is None:  # out of time, or cancelled
            _kill_group(process.pid)
            with anyio.CancelScope(shield=True):
                await process.wait()
        with anyio.CancelScope(shield=True):
            await process.aclose()
    return _Exit(
        answer=_parse_answer(bytes(answer)),
        returncode=process.returncode,
        timed_out=deadline.cancelled_caught,
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


async def _check_in_child(
    stored: StoredUpload, *, kind: str, settings: Settings, slots: ValidationSlots
) -> None:
    """Check ``stored`` in a child under the limits; raise :class:`InputError` (422) when it
    is refused, :class:`ProblemError` (503) when no slot is free."""
    with slots.hold(settings):
        path = stored.path.resolve()  # the child runs in its scratch folder
        memory_bytes = settings.validate_memory_bytes + _MEMORY_PER_UPLOAD_BYTE * stored.size_bytes
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=VALIDATE_PREFIX, dir=settings.cache_dir)).resolve()
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
            exit_ = await _run_child(command, cwd=scratch, timeout_s=settings.validate_timeout_s)
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
    names = {str(path): stored.filename, str(scratch): stored.filename, path.name: stored.filename}
    raise InputError(_scrub(detail, names))


async def validate_model(stored: StoredUpload, settings: Settings, slots: ValidationSlots) -> None:
    """Raise :class:`InputError` when ``stored`` is not a loadable model (checked in a child)."""
    await _check_in_child(stored, kind="model", settings=settings, slots=slots)


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
    stored: StoredUpload, settings: Settings, slots: ValidationSlots
) -> None:
    """Raise :class:`InputError` unless ``stored`` is a readable dataset; a large one is
    parsed in a child (see the module docstring)."""
    parsed = await anyio.to_thread.run_sync(_parsed_bytes, stored.path, stored.filename)
    if parsed > INLINE_DATASET_BYTES:
        await _check_in_child(stored, kind="dataset", settings=settings, slots=slots)
        return
    summary = await anyio.to_thread.run_sync(
        lambda: check_dataset(stored.path, filename=stored.filename)
    )
    log.info("dataset %s is valid: %s", stored.filename, summary)
