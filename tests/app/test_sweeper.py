"""The orphan sweep: each kind of leftover goes, its live twin stays.

Partial uploads, extraction folders and row-less stored files go once older than the grace;
staging folders of attempts that are over, artifact folders of jobs gone, failed or cancelled,
and rows whose file vanished (unless a queued or running job needs them) go whatever their age,
because the database says they are dead. The API sweeps at start-up and then periodically."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from bitplan.app import crud, queue
from bitplan.app.db import make_engine, make_sessionmaker
from bitplan.app.settings import Settings
from bitplan.app.states import JobState
from bitplan.app.sweeper import PERIODIC_GRACE_S, PeriodicSweep, Swept, sweep_settings
from bitplan.app.worker import run_worker
from bitplan.search.pipeline import run_job
from tests.app._api_fixtures import api_client, enqueue_job, job_body
from tests.helpers import wait_until

WAIT_S = 30.0  # how long a test waits for the periodic sweep: far beyond any slowness
OLD_S = PERIODIC_GRACE_S + 10  # an age past the periodic grace


def _touch(path: Path, *, age_s: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    _age(path, age_s)
    return path


def _age(path: Path, age_s: float) -> None:
    past = time.time() - age_s
    os.utime(path, (past, past))


def _leftovers(settings: Settings, *, age_s: float) -> list[Path]:
    owner = settings.upload_dir / "datasets" / "public"
    unzip = settings.cache_dir / "unzipped" / ".unzip-abc"
    validate = settings.cache_dir / ".validate-abc"
    _touch(unzip / "weights.bin", age_s=age_s)
    _touch(validate / "unzipped" / "x" / "config.json", age_s=age_s)
    for folder in (unzip, validate):
        _age(folder, age_s)
    return [
        _touch(owner / ".upload-123.part", age_s=age_s),
        _touch(owner / ("0" * 64 + ".jsonl"), age_s=age_s),  # stored, but no row
        unzip,
        validate,
    ]


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    """The service settings with a cache of this test's own: the shared model cache of the test
    session may hold other test runs' extraction folders, which are not this test's to sweep."""
    return settings.model_copy(update={"cache_dir": tmp_path / "cache"})


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sweep(settings: Settings, engine: Engine) -> Callable[..., Swept]:
    def run(*, min_age_s: float = 0.0) -> Swept:
        return sweep_settings(settings, make_sessionmaker(engine), min_age_s=min_age_s)

    return run


def test_sweep_removes_orphans_and_keeps_recorded_uploads(
    settings: Settings, sweep: Callable[..., Swept], caplog: pytest.LogCaptureFixture
) -> None:
    with api_client(settings) as client:
        kept = client.post("/v1/datasets", files={"file": ("a.jsonl", b'{"text": "hi"}\n')})
        assert kept.status_code == 201
    orphans = _leftovers(settings, age_s=OLD_S)
    with caplog.at_level("INFO", logger="bitplan.app.sweeper"):
        removed = sweep()
    assert sorted(removed.paths) == sorted(orphans) and removed.rows == []
    assert not any(path.exists() for path in orphans)
    assert f"sweep removed {len(orphans)} orphan(s)" in caplog.text
    stored = list(settings.upload_dir.rglob("*.jsonl"))
    assert [p.name for p in stored] == [f"{kept.json()['sha256']}.jsonl"]


def test_sweep_spares_what_is_younger_than_the_grace(
    settings: Settings, sweep: Callable[..., Swept]
) -> None:
    fresh = _leftovers(settings, age_s=0)
    assert not sweep(min_age_s=PERIODIC_GRACE_S)
    assert all(path.exists() for path in fresh)


def test_api_start_up_sweeps(settings: Settings) -> None:
    orphans = _leftovers(settings, age_s=OLD_S)
    with api_client(settings) as client:
        assert isinstance(client, TestClient)
    assert not any(path.exists() for path in orphans)


def test_start_up_sweep_spares_a_workers_extraction_in_flight(
    settings: Settings, sweep: Callable[..., Swept]
) -> None:
    """Extraction folders belong to workers, which outlive an API restart: even a sweep with no
    grace (start-up) leaves a recent one, while the API's own leftovers go."""
    upload, stored, unzip, validate = _leftovers(settings, age_s=10)
    assert sorted(sweep().paths) == sorted([upload, stored, validate])
    assert unzip.exists()


# --- staging folders and artifact folders: judged by the database ---------------------------


def _staging(settings: Settings, job_id: str, lease: int) -> Path:
    folder = settings.artifact_dir / f".{job_id}.{lease}.partial"
    _touch(folder / "frontier.json")  # just written: no grace would protect it, only its job
    return folder


def _claim(engine: Engine) -> queue.ClaimedJob:
    claimed = queue.claim_job(engine, worker_id="w", lease_s=60)
    assert claimed is not None
    return claimed


def test_staging_folders_of_attempts_that_are_over_go_the_running_one_stays(
    settings: Settings, engine: Engine, sweep: Callable[..., Swept]
) -> None:
    cancelled = enqueue_job(engine)
    with make_sessionmaker(engine)() as session:
        crud.request_cancel(session, job_id=cancelled, owner_id=None)
    running = enqueue_job(engine)
    first = _claim(engine)  # the attempt a SIGKILLed worker would leave behind ...
    assert queue.release_job(engine, job_id=running, lease_version=first.lease_version)
    second = _claim(engine)  # ... and the attempt running now
    assert (first.id, second.id, second.lease_version) == (running, running, 2)
    live = _staging(settings, running, 2)
    dead = [
        _staging(settings, running, 1),
        _staging(settings, cancelled, 1),  # cancelled while its worker was dead: never retried
        _staging(settings, str(uuid.uuid4()), 3),  # its job was deleted
    ]
    not_staging = _touch(settings.artifact_dir / ".notes.partial" / "x")
    assert sorted(sweep(min_age_s=PERIODIC_GRACE_S).paths) == sorted(dead)
    assert live.is_dir() and not_staging.exists()
    assert not any(path.exists() for path in dead)


def _results(settings: Settings, name: str) -> Path:
    folder = settings.artifact_dir / name
    _touch(folder / "frontier.json")
    return folder


def test_artifact_folders_of_jobs_gone_failed_or_cancelled_go(
    settings: Settings, engine: Engine, sweep: Callable[..., Swept]
) -> None:
    ids = {state: enqueue_job(engine) for state in ("succeeded", "failed", "running", "queued")}
    claimed = {}
    for _ in ("succeeded", "failed", "running"):  # claimed in the order they were queued
        job = _claim(engine)
        claimed[job.id] = job
    for state in ("succeeded", "failed"):
        job = claimed[ids[state]]
        assert queue.finish_job(
            engine, job_id=job.id, lease_version=job.lease_version, state=JobState(state)
        )
    kept = [_results(settings, ids[state]) for state in ("succeeded", "running", "queued")]
    kept.append(_results(settings, "not-a-job-id"))  # an operator's folder: not ours to judge
    gone = [_results(settings, ids["failed"]), _results(settings, str(uuid.uuid4()))]
    assert sorted(sweep(min_age_s=PERIODIC_GRACE_S).paths) == sorted(gone)
    assert all(path.is_dir() for path in kept) and not any(path.exists() for path in gone)


# --- rows whose stored file vanished -------------------------------------------------------


def _upload(client: TestClient, text: str) -> dict[str, str]:
    answer = client.post("/v1/datasets", files={"file": ("d.jsonl", f'{{"text": "{text}"}}\n')})
    assert answer.status_code == 201, answer.text
    body: dict[str, str] = answer.json()
    return body


def _stored_path(engine: Engine, blob_id: str) -> Path:
    with Session(engine) as session:
        blob = crud.get_blob(session, blob_id=blob_id, owner_id=None)
        assert blob is not None
        return Path(blob.path)


def test_a_row_whose_file_vanished_is_forgotten_unless_a_job_waits_for_it(
    settings: Settings, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    idle_settings = settings.model_copy(update={"sweep_interval_s": 0.0})
    with api_client(idle_settings) as client:
        lost, needed, intact = (_upload(client, text)["id"] for text in ("a", "b", "c"))
        queued = client.post("/v1/jobs", json=job_body(calib=needed))
        assert queued.status_code == 202, queued.text
        for blob_id in (lost, needed):
            _stored_path(engine, blob_id).unlink()  # deleted by hand, or lost with a disk
        with caplog.at_level(logging.WARNING, logger="bitplan.app.sweeper"):
            swept = sweep_settings(settings, client.app.state.sessionmaker)  # type: ignore[attr-defined]
        assert swept.rows == [lost] and swept.paths == []
        assert f"sweep forgot upload {lost}" in caplog.text
        assert client.get(f"/v1/datasets/{lost}").status_code == 404  # the owner uploads again
        assert client.get(f"/v1/datasets/{needed}").status_code == 200  # its job still waits
        assert client.get(f"/v1/datasets/{intact}").status_code == 200
        job_id = queued.json()["id"]
        assert client.post(f"/v1/jobs/{job_id}:cancel").status_code == 202
        swept = sweep_settings(settings, client.app.state.sessionmaker)  # type: ignore[attr-defined]
        assert swept.rows == [needed]
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert (job["state"], job["request"]["calib"]) == ("cancelled", "deleted")


def test_rows_are_kept_when_no_stored_file_is_left_at_all(
    settings: Settings, engine: Engine, sweep: Callable[..., Swept]
) -> None:
    """Every file gone at once is a storage volume that is not mounted, not lost uploads."""
    with api_client(settings.model_copy(update={"sweep_interval_s": 0.0})) as client:
        ids = [_upload(client, text)["id"] for text in ("a", "b")]
    for blob_id in ids:
        _stored_path(engine, blob_id).unlink()
    assert not sweep()
    with Session(engine) as session:
        assert [crud.get_blob(session, blob_id=i, owner_id=None) is not None for i in ids] == [
            True,
            True,
        ]


def test_rows_outside_the_upload_folder_are_left_alone(
    settings: Settings,
    engine: Engine,
    sweep: Callable[..., Swept],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A row under another folder means the upload folder setting changed, not a lost file."""
    _touch(settings.upload_dir / "datasets" / "public" / "kept.jsonl")  # storage is mounted
    with Session(engine) as session:
        elsewhere, _ = crud.create_or_get_blob(
            session,
            owner_id=None,
            kind="dataset",
            sha256="1" * 64,
            filename="old.jsonl",
            size_bytes=1,
            path=str(tmp_path / "old-uploads" / "old.jsonl"),
        )
        blob_id = elsewhere.id
    with caplog.at_level(logging.WARNING, logger="bitplan.app.sweeper"):
        assert sweep().rows == []
    assert "left 1 row(s) whose file is outside" in caplog.text
    with Session(engine) as session:
        assert crud.get_blob(session, blob_id=blob_id, owner_id=None) is not None


def test_a_job_whose_upload_vanished_fails_naming_the_upload(
    settings: Settings, engine: Engine
) -> None:
    stored = settings.upload_dir / "models" / "public" / ("ab" * 32 + ".zip")
    job_id = enqueue_job(engine, model=str(stored), model_name="my-model.zip", trials=2)
    assert run_worker(settings, once=True, runner=run_job) == 1
    with Session(engine) as session:
        job = crud.get_job(session, job_id=job_id, owner_id=None)
        assert job is not None and job.error is not None
    assert job.state == JobState.FAILED
    assert "'my-model.zip' does not exist" in job.error
    assert str(settings.data_dir) not in job.error


# --- the periodic sweep ----------------------------------------------------------------------


def test_the_api_sweeps_periodically_and_spares_uploads_in_flight(
    settings: Settings, engine: Engine
) -> None:
    fast = settings.model_copy(update={"sweep_interval_s": 0.05})
    with api_client(fast):
        # Created after the start-up sweep: only a periodic one can remove them.
        abandoned = _touch(
            settings.upload_dir / "models" / "public" / ".upload-1.part", age_s=OLD_S
        )
        in_flight = _touch(settings.upload_dir / "models" / "public" / ".upload-2.part")
        dead_attempt = _staging(settings, str(uuid.uuid4()), 1)
        wait_until(
            lambda: not abandoned.exists() and not dead_attempt.exists(),
            "periodic sweep",
            within_s=WAIT_S,
        )
        assert in_flight.exists()


def test_a_periodic_sweep_spares_uploads_younger_than_their_longest_check(
    settings: Settings, engine: Engine
) -> None:
    """A stored upload gets its row only after its check: when a check may take longer than
    the periodic grace, a row-less file and a scratch folder that old may be a check still
    running, and stay; older ones go."""
    slow = settings.model_copy(update={"validate_timeout_s": 2 * PERIODIC_GRACE_S})
    owner = settings.upload_dir / "models" / "public"
    in_check = [
        _touch(owner / ("1" * 64 + ".zip"), age_s=OLD_S),  # past the default grace only
        _touch(settings.cache_dir / ".validate-in-check" / "x.bin", age_s=OLD_S).parent,
    ]
    _age(in_check[1], OLD_S)
    abandoned = _touch(owner / ("2" * 64 + ".zip"), age_s=3 * PERIODIC_GRACE_S)
    periodic = PeriodicSweep(slow, make_sessionmaker(engine), interval_s=0.02).start()
    try:
        wait_until(lambda: periodic.sweeps >= 1, "a periodic sweep", within_s=WAIT_S)
    finally:
        periodic.stop()
    assert all(path.exists() for path in in_check) and not abandoned.exists()


def test_a_failed_periodic_sweep_is_logged_and_retried(
    settings: Settings, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0
    sessions = make_sessionmaker(engine)

    def flaky() -> Session:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("the database is away")
        return sessions()

    periodic = PeriodicSweep(settings, flaky, interval_s=0.02).start()
    try:
        with caplog.at_level(logging.WARNING, logger="bitplan.app.sweeper"):
            wait_until(lambda: periodic.sweeps >= 1, "a sweep after the failure", within_s=WAIT_S)
    finally:
        periodic.stop()
    assert "periodic sweep failed" in caplog.text and "the database is away" in caplog.text


def test_interval_zero_never_sweeps(settings: Settings, engine: Engine) -> None:
    periodic = PeriodicSweep(
        settings.model_copy(update={"sweep_interval_s": 0.0}), make_sessionmaker(engine)
    ).start()
    orphan = _staging(settings, str(uuid.uuid4()), 1)
    time.sleep(0.2)  # what a sweep every 0 s would have needed many times over
    periodic.stop()
    assert periodic.sweeps == 0 and orphan.exists()
