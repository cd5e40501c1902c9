"""The worker end to end, with a small deterministic runner standing in for the pipeline:
results, failures, cancel, throttled progress, a worker killed with SIGKILL mid-job (the job is
reclaimed after its lease and succeeds exactly once) and SIGTERM (the job goes back to the
queue). The subprocess tests run on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from bitplan.app import crud, worker
from bitplan.app.db import make_engine, make_sessionmaker
from bitplan.app.models import Job
from bitplan.app.settings import Settings
from bitplan.search.spec import JobSpec
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.progress import CancelFn, ProgressFn, check_cancel, report

STEP_S = 0.1  # one runner step; a job of `trials` steps runs trials * STEP_S seconds
LOG_ENV = "BITPLAN_TEST_RUNNER_LOG"  # where the runner double notes starts and completions


def _note(line: str) -> None:
    with open(os.environ[LOG_ENV], "a") as log:
        log.write(line + "\n")


def steady_runner(
    spec: JobSpec,
    *,
    out_dir: Path,
    cache_dir: Path,
    progress: ProgressFn,
    should_cancel: CancelFn,
    optuna_storage: str | None,
    study_name: str,
) -> None:
    """``spec.trials`` steps of STEP_S seconds, then a frontier and one plan, like run_job."""
    _note(f"start {study_name} {os.getpid()}")
    for step in range(1, spec.trials + 1):
        check_cancel(should_cancel)
        time.sleep(STEP_S)
        report(progress, "search", step, spec.trials)
    (out_dir / "plans").mkdir()
    (out_dir / "plans" / "plan-0001.json").write_text(json.dumps({"budget": spec.budget}))
    (out_dir / "frontier.json").write_text(json.dumps({"schema": "bitplan.frontier/v1"}))
    _note(f"done {study_name} {os.getpid()}")


def chatty_runner(spec: JobSpec, *, progress: ProgressFn, **_: Any) -> None:
    for step in range(1, 2001):
        report(progress, "analyze", step, 2000)


def bad_input_runner(spec: JobSpec, **_: Any) -> None:
    raise InputError("calibration file has no rows; give at least one")


def crashing_runner(spec: JobSpec, **_: Any) -> None:
    raise RuntimeError("boom")


@pytest.fixture
def runner_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "runner.log"
    log.touch()
    monkeypatch.setenv(LOG_ENV, str(log))
    return log


@pytest.fixture
def engine_sqlite(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.database_url)
    yield engine
    engine.dispose()


def _settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        data_dir=tmp_path / "data",
        auth="off",
        lease_seconds=1.5,
        heartbeat_seconds=0.3,
        poll_seconds=0.05,
        optuna_storage=None,
        worker_runner="test_worker:steady_runner",
    )


def _enqueue(engine: Engine, *, trials: int, max_attempts: int = 3) -> str:
    spec = JobSpec(model="builtin:digits-cnn", budget="4bpw", trials=trials).to_dict()
    with make_sessionmaker(engine)() as session:
        return crud.create_job(
            session,
            owner_id=None,
            spec=spec,
            model_id=None,
            dataset_id=None,
            idempotency_key=None,
            request_hash=None,
            max_attempts=max_attempts,
        ).id


def _job(engine: Engine, job_id: str) -> Job:
    with make_sessionmaker(engine)() as session:
        return crud.get_job(session, job_id=job_id, owner_id=None)


def _wait_for(predicate: Callable[[], bool], *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def _partials(settings: Settings) -> list[Path]:
    return list(settings.artifact_dir.glob(".*.partial"))


def test_worker_runs_a_job_and_publishes_its_artifacts(
    settings: Settings, runner_log: Path, engine_sqlite: Engine
) -> None:
    job_id = _enqueue(engine_sqlite, trials=3)
    assert worker.run_worker(settings, once=True, runner=steady_runner) == 1
    job = _job(engine_sqlite, job_id)
    out = settings.artifact_dir / job_id
    assert (job.state, job.stage, job.progress, job.attempts) == ("succeeded", "succeeded", 1.0, 1)
    assert job.result == {"artifact_dir": str(out), "plan_ids": ["plan-0001"]}
    assert (out / "frontier.json").is_file() and not _partials(settings)
    assert runner_log.read_text().count(f"done bitplan-{job_id}") == 1


@pytest.mark.parametrize(
    ("runner", "message"),
    [
        (bad_input_runner, "calibration file has no rows; give at least one"),
        (crashing_runner, "internal error: RuntimeError: boom"),
    ],
)
def test_runner_errors_fail_the_job_with_the_reason(
    settings: Settings, engine_sqlite: Engine, runner: Callable[..., None], message: str
) -> None:
    job_id = _enqueue(engine_sqlite, trials=1)
    worker.run_worker(settings, once=True, runner=runner)
    job = _job(engine_sqlite, job_id)
    assert (job.state, job.error, job.result) == ("failed", message, None)
    assert not (settings.artifact_dir / job_id).exists() and not _partials(settings)


def test_invalid_spec_fails_without_running(
    settings: Settings, engine_sqlite: Engine, runner_log: Path
) -> None:
    with make_sessionmaker(engine_sqlite)() as session:
        job_id = crud.create_job(
            session,
            owner_id=None,
            spec={"model": "builtin:digits-cnn", "budget": "4bpw", "colour": "red"},
            model_id=None,
            dataset_id=None,
            idempotency_key=None,
            request_hash=None,
            max_attempts=3,
        ).id
    worker.run_worker(settings, once=True, runner=steady_runner)
    job = _job(engine_sqlite, job_id)
    assert job.state == "failed" and job.error.startswith("invalid job spec:")
    assert "colour" in job.error and runner_log.read_text() == ""


def test_progress_writes_are_throttled(
    settings: Settings, engine_sqlite: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[tuple[str, float]] = []
    real = worker.set_progress

    def counting(engine: Engine, **kwargs: Any) -> bool:
        writes.append((kwargs["stage"], kwargs["progress"]))
        return real(engine, **kwargs)

    monkeypatch.setattr(worker, "set_progress", counting)
    _enqueue(engine_sqlite, trials=1)
    started = time.monotonic()
    worker.run_worker(settings, once=True, runner=chatty_runner)
    allowed = 2 + (time.monotonic() - started) / worker.PROGRESS_INTERVAL_S
    assert writes[0] == ("analyze", round(1 / 2000, 3)) and writes[-1] == ("analyze", 1.0)
    assert len(writes) <= allowed


def test_cancel_stops_a_running_job(
    settings: Settings, runner_log: Path, engine_sqlite: Engine
) -> None:
    job_id = _enqueue(engine_sqlite, trials=200)
    stop = threading.Event()
    thread = threading.Thread(
        target=worker.run_worker,
        args=(settings,),
        kwargs={"stop_event": stop, "runner": steady_runner},
    )
    thread.start()
    try:
        _wait_for(lambda: _job(engine_sqlite, job_id).progress > 0)
        with make_sessionmaker(engine_sqlite)() as session:
            crud.request_cancel(session, job_id=job_id, owner_id=None)
        _wait_for(lambda: _job(engine_sqlite, job_id).state == "cancelled", timeout=10)
    finally:
        stop.set()
        thread.join(timeout=10)
    job = _job(engine_sqlite, job_id)
    assert job.progress < 0.5 and job.lease_owner is None and job.finished_at is not None
    assert "done" not in runner_log.read_text()


def _spawn(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> subprocess.Popen[bytes]:
    here, root = Path(__file__).resolve().parent, Path(__file__).resolve().parents[2]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(here), str(root)]))
    (proc,) = worker.spawn_workers(settings, count=1)
    return proc


def _running_with_progress(
    engine: Engine, job_id: str, proc: subprocess.Popen[bytes]
) -> Callable[[], bool]:
    def check() -> bool:
        assert proc.poll() is None, "worker process exited early"
        job = _job(engine, job_id)
        return job.state == "running" and job.progress > 0

    return check


def test_sigkill_mid_job_is_reclaimed_and_succeeds_once(
    tmp_path: Path,
    db_url: str,
    engine: Engine,
    runner_log: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _settings(tmp_path, db_url)
    job_id = _enqueue(engine, trials=15)
    proc = _spawn(settings, monkeypatch)
    try:
        _wait_for(_running_with_progress(engine, job_id, proc))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    dead = _job(engine, job_id)
    assert dead.state == "running" and dead.attempts == 1
    # Nobody releases the job: it comes back only when its lease has run out.
    assert worker.run_worker(settings, once=True, runner=steady_runner) == 0
    _wait_for(lambda: worker.run_worker(settings, once=True, runner=steady_runner) == 1, timeout=10)
    job = _job(engine, job_id)
    assert (job.state, job.attempts, job.lease_version) == ("succeeded", 2, 2)
    lines = runner_log.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["start", "start", "done"]
    assert lines[0].split()[2] == str(proc.pid) and lines[2].split()[2] == str(os.getpid())
    assert (settings.artifact_dir / job_id / "frontier.json").is_file()
    assert not _partials(settings)


def test_sigterm_releases_the_job_and_exits(
    tmp_path: Path, sqlite_url: str, runner_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path, sqlite_url)
    engine = make_engine(sqlite_url)
    job_id = _enqueue(engine, trials=200)
    proc = _spawn(settings, monkeypatch)
    try:
        _wait_for(_running_with_progress(engine, job_id, proc))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    job = _job(engine, job_id)
    assert (job.state, job.attempts, job.lease_owner) == ("queued", 0, None)
    assert "done" not in runner_log.read_text()
    engine.dispose()
