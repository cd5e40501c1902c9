"""Uploads are checked in child processes with limits (bitplan.app.validation): every way a
check can end is a 422 naming the file (never a server path) that leaves nothing behind, the
child and whatever it started are killed past its time, after it answers or when the client
goes, a few checks run at once, and a check the server cannot run is a 503 to retry.

Most tests run a stand-in child (tests/app/_fake_upload_check.py) that answers at once; the
last ones run the real check, which imports torch and transformers in a fresh process (a few
seconds each).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import pytest
from fastapi.testclient import TestClient

from bitplan.app.embedded import embedded_service
from bitplan.app.problems import ProblemError
from bitplan.app.settings import Settings
from bitplan.app.upload_check import run_check
from bitplan.app.uploads import VALIDATE_PREFIX, StoredUpload
from bitplan.app.validation import (
    INLINE_DATASET_BYTES,
    ValidationSlots,
    validate_dataset,
    validate_model,
    validation_slots,
)
from bitplan.sensitivity.errors import InputError
from tests.app._api_fixtures import api_client, assert_problem
from tests.helpers import process_gone, tiny_bert_files, wait_until, zip_bytes

_ROOT = Path(__file__).resolve().parents[2]
_MIB = 1 << 20
# How long a test waits for a stand-in to start (a fresh interpreter: well under a second
# unless the machine is very busy) or for a killed one to be gone.
_WAIT_S = 10.0
# How soon a hang-up must stop its check: the API notices at once; this is for a busy machine.
_HANG_UP_S = 5.0


def _files(settings: Settings) -> list[Path]:
    """The stored uploads (the cache folder is shared with other tests: see _scratch_dirs)."""
    root = settings.upload_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _scratch_dirs(settings: Settings) -> list[Path]:
    """The checks' scratch folders (a zip is extracted inside its check's own)."""
    return list(settings.cache_dir.glob(f"{VALIDATE_PREFIX}*"))


@dataclass(frozen=True)
class FakeCheck:
    """Where the stand-in child says what it did (see tests/app/_fake_upload_check.py)."""

    pidfile: Path
    runs_file: Path
    grandchild_pidfile: Path

    def pid(self) -> int:
        """The pid of the last stand-in started, waiting for it to start if need be."""
        wait_until(self.pidfile.exists, "the stand-in check started", within_s=_WAIT_S)
        return int(self.pidfile.read_text())

    def grandchild(self) -> int:
        wait_until(
            self.grandchild_pidfile.exists, "the stand-in started its grandchild", within_s=_WAIT_S
        )
        return int(self.grandchild_pidfile.read_text())

    def runs(self) -> int:
        """How many stand-ins have started."""
        return len(self.runs_file.read_text().split()) if self.runs_file.exists() else 0


@pytest.fixture
def fake_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeCheck]:
    """Run the stand-in child instead of the real check."""
    monkeypatch.setattr("bitplan.app.validation.CHILD_MODULE", "tests.app._fake_upload_check")
    monkeypatch.setenv("PYTHONPATH", str(_ROOT))  # the child runs in its scratch folder
    fake = FakeCheck(tmp_path / "child.pid", tmp_path / "runs", tmp_path / "grandchild.pid")
    monkeypatch.setenv("BITPLAN_TEST_CHECK_PIDFILE", str(fake.pidfile))
    monkeypatch.setenv("BITPLAN_TEST_CHECK_RUNS", str(fake.runs_file))
    monkeypatch.setenv("BITPLAN_TEST_GRANDCHILD_PIDFILE", str(fake.grandchild_pidfile))
    yield fake


def _upload(client: TestClient, name: str, data: bytes, kind: str = "models") -> httpx.Response:
    return client.post(f"/v1/{kind}", files={"file": (name, data)})


@pytest.mark.parametrize(
    ("mode", "needles"),
    [
        ("oom", ["m.zip: checking it ran out of its", "memory limit", "VALIDATE_MEMORY_BYTES"]),
        ("failed", ["m.zip cannot be loaded (RuntimeError)"]),
        ("killed", ["m.zip: its check stopped without an answer (signal SIGKILL)", "memory"]),
        ("garbage", ["m.zip: its check stopped without an answer (exit status 0)"]),
        ("invalid", ["m.zip: bad, see m.zip/x"]),
    ],
)
def test_every_failed_check_is_a_422_naming_the_file_that_leaves_nothing(
    settings: Settings,
    fake_check: FakeCheck,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    needles: list[str],
) -> None:
    monkeypatch.setenv("BITPLAN_TEST_CHECK", mode)
    with api_client(settings) as client:
        problem = assert_problem(_upload(client, "m.zip", b"PK whatever"), 422)
        assert client.get("/v1/models").json()["data"] == []
    for needle in needles:
        assert needle in problem["detail"], problem["detail"]
    text = json.dumps(problem)
    assert str(settings.data_dir) not in text and str(settings.data_dir.resolve()) not in text
    assert _files(settings) == [] and _scratch_dirs(settings) == []
    assert process_gone(fake_check.pid())


def test_a_valid_check_keeps_the_upload(
    settings: Settings, fake_check: FakeCheck, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITPLAN_TEST_CHECK", "valid")
    with api_client(settings) as client:
        answer = _upload(client, "m.zip", b"PK whatever")
        assert answer.status_code == 201, answer.text
    assert [p.suffix for p in _files(settings)] == [".zip"]  # the upload, no scratch file
    assert _scratch_dirs(settings) == []


def test_a_check_that_leaves_a_process_behind_is_answered_and_the_process_killed(
    settings: Settings, fake_check: FakeCheck, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stand-in answers valid and exits, leaving ``sleep 60`` with its stdout and stderr:
    the answer counts (no wait for pipes that stay open) and the leftover is killed."""
    monkeypatch.setenv("BITPLAN_TEST_CHECK", "grandchild")
    # Far under the grandchild's 60 s: waiting for its pipes would end as "took longer".
    quick = settings.model_copy(update={"validate_timeout_s": _WAIT_S})
    with api_client(quick) as client:
        answer = _upload(client, "m.zip", b"PK whatever")
        assert answer.status_code == 201, answer.text
    wait_until(
        lambda: process_gone(fake_check.grandchild()),
        "the check's grandchild killed",
        within_s=_WAIT_S,
    )
    assert process_gone(fake_check.pid()) and _scratch_dirs(settings) == []


def test_a_check_past_its_time_is_killed_and_named(
    settings: Settings, fake_check: FakeCheck, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITPLAN_TEST_CHECK", "sleep")
    # Long enough for the stand-in to start and write its pid on a busy machine.
    quick = settings.model_copy(update={"validate_timeout_s": _HANG_UP_S})
    with api_client(quick) as client:
        problem = assert_problem(_upload(client, "slow.zip", b"PK whatever"), 422)
    assert problem["detail"] == (
        f"slow.zip: checking it took longer than its {_HANG_UP_S:g} s limit "
        "(BITPLAN_VALIDATE_TIMEOUT_S)"
    )
    assert process_gone(fake_check.pid())
    assert _files(settings) == [] and _scratch_dirs(settings) == []


def test_a_cancelled_check_is_killed(
    settings: Settings, fake_check: FakeCheck, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Cancelling the awaiting task (as a server shutting down does) kills the child."""
    monkeypatch.setenv("BITPLAN_TEST_CHECK", "sleep")
    upload = tmp_path / "m.zip"
    upload.write_bytes(b"PK whatever")
    stored = StoredUpload(path=upload, sha256="0" * 64, size_bytes=11, filename="m.zip")
    slots = ValidationSlots(1)

    async def cancel_once_started() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(validate_model, stored, settings, slots)
            await anyio.to_thread.run_sync(fake_check.pid)  # it is running
            group.cancel_scope.cancel()

    anyio.run(cancel_once_started)
    assert process_gone(fake_check.pid())
    assert _scratch_dirs(settings) == [] and slots.busy == 0


def _raw_upload(name: str, data: bytes) -> bytes:
    """A whole multipart upload to /v1/models as bytes on the wire."""
    boundary = "b0undary"
    body = (
        (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        "POST /v1/models HTTP/1.1\r\nHost: localhost\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def test_a_client_that_hangs_up_mid_check_gets_its_check_killed(
    settings: Settings,
    fake_check: FakeCheck,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under uvicorn, a client that closes its socket while its upload is checked: the child
    is killed and its scratch folder and the stored upload removed, with no error logged."""
    monkeypatch.setenv("BITPLAN_TEST_CHECK", "sleep")
    served = settings.model_copy(update={"port": 0, "validate_timeout_s": 120.0})
    with caplog.at_level(logging.INFO), embedded_service(served, workers=0) as url:
        host, _, port = url.removeprefix("http://").rpartition(":")
        with socket.create_connection((host, int(port)), timeout=_WAIT_S) as conn:
            conn.sendall(_raw_upload("m.zip", b"PK whatever"))
            child = fake_check.pid()  # the check is running: now hang up
        wait_until(
            lambda: process_gone(child) and not _scratch_dirs(settings) and not _files(settings),
            "the check killed and its files removed after the client hung up",
            within_s=_HANG_UP_S,
        )
    assert "m.zip: its client hung up; its check was stopped" in caplog.text
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_model_upload_finding_every_slot_taken_is_503_before_its_body(
    settings: Settings, fake_check: FakeCheck, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITPLAN_TEST_CHECK", "valid")
    with api_client(settings) as client:
        slots = validation_slots(client.app.state, settings)  # type: ignore[attr-defined]
        slots.busy = slots.total  # as if max_validations checks were running
        problem = assert_problem(_upload(client, "m.zip", b"PK whatever"), 503)
        assert "BITPLAN_MAX_VALIDATIONS" in problem["detail"]
        assert fake_check.runs() == 0
        slots.busy = 0
        assert _upload(client, "m.zip", b"PK whatever").status_code == 201
    assert fake_check.runs() == 1  # for the second upload only


def test_the_503_says_when_to_retry(settings: Settings) -> None:
    busy = settings.model_copy(update={"validate_retry_after_s": 7, "max_validations": 3})
    slots = ValidationSlots(busy.max_validations)
    slots.busy = 3
    with pytest.raises(ProblemError) as refused, slots.hold(busy):
        pass
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "7"}
    assert "retry after 7 s" in str(refused.value) and slots.busy == 3


def _assert_retry_later(response: httpx.Response, settings: Settings) -> None:
    """A 503 to retry after BITPLAN_VALIDATE_RETRY_AFTER_S that names no server path, the
    upload and any scratch folder gone."""
    problem = assert_problem(response, 503)
    assert response.headers["Retry-After"] == str(settings.validate_retry_after_s)
    assert f"retry after {settings.validate_retry_after_s} s" in problem["detail"]
    assert str(settings.data_dir) not in json.dumps(problem)
    assert _files(settings) == [] and _scratch_dirs(settings) == []


def test_a_check_without_room_for_its_scratch_folder_is_a_503_not_the_files_fault(
    settings: Settings, fake_check: FakeCheck, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BITPLAN_TEST_CHECK", "valid")
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")  # the cache folder's parent is a file: mkdir fails (ENOTDIR)
    cramped = settings.model_copy(update={"cache_dir": blocker / "cache"})
    with api_client(cramped) as client:
        _assert_retry_later(_upload(client, "m.zip", b"PK whatever"), cramped)
    assert fake_check.runs() == 0


def test_a_check_that_cannot_start_is_a_503_with_retry_after(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fork_fails(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))  # fork(2) at the process limit

    monkeypatch.setattr("bitplan.app.validation.anyio.open_process", fork_fails)
    with api_client(settings) as client:
        _assert_retry_later(_upload(client, "m.zip", b"PK whatever"), settings)


def test_datasets_parsed_in_the_api_process_are_a_few_at_a_time(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lock, running, most = threading.Lock(), [0], [0]

    def parse(_path: Path, *, filename: str) -> str:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        # two parses overlap however slowly threads start; then hold on, so that any parse let
        # in beyond the limit would overlap too
        wait_until(lambda: most[0] >= 2, "two dataset parses at once", within_s=30)
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return filename

    monkeypatch.setattr("bitplan.app.validation.check_dataset", parse)
    slots = ValidationSlots(1, inline=2)
    uploads = []
    for i in range(5):
        (tmp_path / f"{i}.txt").write_bytes(b"a sample\n")
        uploads.append(StoredUpload(tmp_path / f"{i}.txt", "0" * 64, 9, f"{i}.txt"))

    async def burst() -> None:
        async with anyio.create_task_group() as group:
            for stored in uploads:
                group.start_soon(validate_dataset, stored, settings, slots)

    anyio.run(burst)
    assert most[0] == 2


def test_a_large_dataset_is_checked_in_a_child_a_small_one_is_not(
    settings: Settings, fake_check: FakeCheck, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITPLAN_TEST_CHECK", "invalid")  # the stand-in refuses everything
    roomy = settings.model_copy(update={"max_upload_bytes": 4 * _MIB})
    with api_client(roomy) as client:
        small = _upload(client, "small.txt", b"a sample\n" * 100, kind="datasets")
        assert small.status_code == 201, small.text
        assert fake_check.runs() == 0
        big = b"a sample\n" * (INLINE_DATASET_BYTES // 9 + 1)
        problem = assert_problem(_upload(client, "big.txt", big, kind="datasets"), 422)
        assert problem["detail"].startswith("big.txt: bad") and fake_check.runs() == 1
        slots = validation_slots(client.app.state, roomy)  # type: ignore[attr-defined]
        slots.busy = slots.total
        busy = _upload(client, "big2.txt", big + b"x\n", kind="datasets")
        assert_problem(busy, 503)  # after its body: only its size said it needs a child
        assert _upload(client, "small2.txt", b"b\n", kind="datasets").status_code == 201
    stored = sorted(p.name for p in _files(roomy))
    assert len(stored) == 2 and all(name.endswith(".txt") for name in stored)


def _raises(exc: BaseException) -> object:
    def check(*_args: object, **_kwargs: object) -> str:
        raise exc

    return check


def _wrapped(message: str, cause: BaseException) -> InputError:
    """An InputError raised ``from None`` while handling ``cause``, as the loaders do."""
    try:
        try:
            raise cause
        except type(cause):
            raise InputError(message) from None
    except InputError as exc:
        return exc


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (MemoryError(), "out-of-memory"),
        (_wrapped("m: cannot build", RuntimeError("DefaultCPUAllocator: can't allocate memory")),
         "out-of-memory"),
        (InputError("m: unable to mmap 5 bytes from file <m>: Cannot allocate memory (12)"),
         "out-of-memory"),
        (InputError("m: config.json is missing"), "invalid"),
        (KeyError("vocab_size"), "failed"),
    ],
)  # fmt: skip
def test_the_child_tells_running_out_of_memory_from_a_bad_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: BaseException, outcome: str
) -> None:
    monkeypatch.setattr("bitplan.app.upload_check.check_model", _raises(error))
    limit = resource.getrlimit(resource.RLIMIT_DATA)
    answer = run_check(
        kind="model",
        path=tmp_path / "m.zip",
        filename="m.zip",
        trusted=False,
        scratch=tmp_path,
        memory_bytes=1 << 60,  # no limit in effect: only the classification is tested
    )
    assert answer["outcome"] == outcome
    assert resource.getrlimit(resource.RLIMIT_DATA) == limit  # only the check ran under it
    if outcome == "invalid":
        assert answer["detail"] == str(error)


# --- the real child ------------------------------------------------------------------------


def test_the_real_check_runs_out_of_its_memory_limit_with_a_422(
    settings: Settings, tmp_path: Path
) -> None:
    archive = zip_bytes(tiny_bert_files(tmp_path / "bert"))
    # Below what torch alone takes: the check's first allocation fails in the child.
    starved = settings.model_copy(update={"validate_memory_bytes": _MIB})
    with api_client(starved) as client:
        problem = assert_problem(_upload(client, "bert.zip", archive), 422)
    assert problem["detail"].startswith("bert.zip: checking it ran out of its 1 MiB memory limit")
    assert "BITPLAN_VALIDATE_MEMORY_BYTES" in problem["detail"]
    assert _files(settings) == [] and _scratch_dirs(settings) == []


def test_the_real_check_parses_a_large_dataset_and_names_its_bad_line(settings: Settings) -> None:
    roomy = settings.model_copy(update={"max_upload_bytes": 4 * _MIB})
    line = b'{"text": "a calibration sample"}\n'
    good = line * (INLINE_DATASET_BYTES // len(line) + 1)
    with api_client(roomy) as client:
        problem = assert_problem(_upload(client, "big.jsonl", good + b"oops\n", "datasets"), 422)
        lines = good.count(b"\n") + 1
        assert problem["detail"].startswith(f"big.jsonl line {lines} is not valid JSON")
        assert _upload(client, "big.jsonl", good, "datasets").status_code == 201
    assert [p.suffix for p in _files(roomy)] == [".jsonl"] and _scratch_dirs(roomy) == []
