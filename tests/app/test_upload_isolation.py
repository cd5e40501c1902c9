"""Uploads are checked in child processes with limits (bitplan.app.validation): every way a
check can end is a 422 naming the file (never a server path) that leaves nothing behind, the
child is killed past its time or when the client goes, and a few checks run at once.

Most tests run a stand-in child (tests/app/_fake_upload_check.py) that answers at once; the
last ones run the real check, which imports torch and transformers in a fresh process (a few
seconds each).
"""

from __future__ import annotations

import json
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from fastapi.testclient import TestClient

from bitplan.app.problems import ProblemError
from bitplan.app.settings import Settings
from bitplan.app.upload_check import run_check
from bitplan.app.uploads import VALIDATE_PREFIX, StoredUpload
from bitplan.app.validation import (
    INLINE_DATASET_BYTES,
    ValidationSlots,
    validate_model,
    validation_slots,
)
from bitplan.sensitivity.errors import InputError
from tests.app._api_fixtures import api_client, assert_problem
from tests.helpers import tiny_bert_files, zip_bytes

_ROOT = Path(__file__).resolve().parents[2]
_MIB = 1 << 20


def _files(settings: Settings) -> list[Path]:
    """The stored uploads (the cache folder is shared with other tests: see _scratch_dirs)."""
    root = settings.upload_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _scratch_dirs(settings: Settings) -> list[Path]:
    """The checks' scratch folders (a zip is extracted inside its check's own)."""
    return list(settings.cache_dir.glob(f"{VALIDATE_PREFIX}*"))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def fake_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """Run the stand-in child; yields the file it writes its pid to."""
    monkeypatch.setattr("bitplan.app.validation.CHILD_MODULE", "tests.app._fake_upload_check")
    monkeypatch.setenv("PYTHONPATH", str(_ROOT))  # the child runs in its scratch folder
    pidfile = tmp_path / "child.pid"
    monkeypatch.setenv("BITPLAN_TEST_CHECK_PIDFILE", str(pidfile))
    yield pidfile


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
    fake_check: Path,
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
    assert _gone(int(fake_check.read_text()))


def test_a_valid_check_keeps_the_upload(
    settings: Settings, fake_check: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITPLAN_TEST_CHECK", "valid")
    with api_client(settings) as client:
        answer = _upload(client, "m.zip", b"PK whatever")
        assert answer.status_code == 201, answer.text
    assert [p.suffix for p in _files(settings)] == [".zip"]  # the upload, no scratch file
    assert _scratch_dirs(settings) == []


def test_a_check_past_its_time_is_killed_and_named(
    settings: Settings, fake_check: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITPLAN_TEST_CHECK", "sleep")
    quick = settings.model_copy(update={"validate_timeout_s": 1.0})
    with api_client(quick) as client:
        problem = assert_problem(_upload(client, "slow.zip", b"PK whatever"), 422)
    assert problem["detail"] == (
        "slow.zip: checking it took longer than its 1 s limit (BITPLAN_VALIDATE_TIMEOUT_S)"
    )
    assert _gone(int(fake_check.read_text()))
    assert _files(settings) == [] and _scratch_dirs(settings) == []


def test_a_client_that_goes_away_gets_its_check_killed(
    settings: Settings, fake_check: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BITPLAN_TEST_CHECK", "sleep")
    upload = tmp_path / "m.zip"
    upload.write_bytes(b"PK whatever")
    stored = StoredUpload(path=upload, sha256="0" * 64, size_bytes=11, filename="m.zip")
    slots = ValidationSlots(1)

    async def hang_up() -> None:
        with anyio.move_on_after(1.0):  # the request's task is cancelled when its client goes
            await validate_model(stored, settings, slots)

    anyio.run(hang_up)
    assert _gone(int(fake_check.read_text()))
    assert _scratch_dirs(settings) == [] and slots.busy == 0


def test_a_model_upload_finding_every_slot_taken_is_503_before_its_body(
    settings: Settings, fake_check: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITPLAN_TEST_CHECK", "valid")
    with api_client(settings) as client:
        slots = validation_slots(client.app.state, settings)  # type: ignore[attr-defined]
        slots.busy = slots.total  # as if max_validations checks were running
        problem = assert_problem(_upload(client, "m.zip", b"PK whatever"), 503)
        assert "BITPLAN_MAX_VALIDATIONS" in problem["detail"]
        slots.busy = 0
        assert _upload(client, "m.zip", b"PK whatever").status_code == 201
    assert fake_check.exists()  # the stand-in ran once: for the second upload only


def test_the_503_says_when_to_retry(settings: Settings) -> None:
    busy = settings.model_copy(update={"validate_retry_after_s": 7, "max_validations": 3})
    slots = ValidationSlots(busy.max_validations)
    slots.busy = 3
    with pytest.raises(ProblemError) as refused, slots.hold(busy):
        pass
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "7"}
    assert "retry after 7 s" in str(refused.value) and slots.busy == 3


def test_a_large_dataset_is_checked_in_a_child_a_small_one_is_not(
    settings: Settings, fake_check: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITPLAN_TEST_CHECK", "invalid")  # the stand-in refuses everything
    roomy = settings.model_copy(update={"max_upload_bytes": 4 * _MIB})
    with api_client(roomy) as client:
        small = _upload(client, "small.txt", b"a sample\n" * 100, kind="datasets")
        assert small.status_code == 201, small.text
        big = b"a sample\n" * (INLINE_DATASET_BYTES // 9 + 1)
        problem = assert_problem(_upload(client, "big.txt", big, kind="datasets"), 422)
        assert problem["detail"].startswith("big.txt: bad")
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
