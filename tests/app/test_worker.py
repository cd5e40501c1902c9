"""The worker end to end, with small runners standing in for the pipeline: results, failures,
cancel, throttled progress, losing the lease while alive (the worker stops and publishes
nothing), a worker killed with SIGKILL mid-job (the job is reclaimed after its lease and
succeeds exactly once) and SIGTERM (the job goes back to the queue). The subprocess tests run on
SQLite and PostgreSQL.

No assert depends on how fast this machine is: throttling runs on a clock the runner advances,
and everything else waits for a condition with a generous timeout instead of sleeping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, update

from bitplan.app import crud, queue, worker
from bitplan.app.db import make_engine, make_sessionmaker
from bitplan.app.job_progress import ProgressSnapshot
from bitplan.app.models import Job, utcnow
from bitplan.app.settings import Settings
from bitplan.app.states import JobState
from bitplan.search.spec import JobSpec
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.progress import CancelFn, ProgressFn, check_cancel, report
from tests.app._api_fixtures import enqueue_job
from tests.helpers import wait_until

STEP_S = 0.1  # one runner step; a job of `trials` steps runs trials * STEP_S seconds
LOG_ENV = "BITPLAN_TEST_RUNNER_LOG"  # where the runner double notes starts and completions
WAIT_S = 60.0  # how long a test waits for a condition: far beyond any plausible slowness
THIEF = "thief"  # the worker that takes a job over in the lease tests


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


def until_cancelled_runner(
    spec: JobSpec, *, progress: ProgressFn, should_cancel: CancelFn, study_name: str, **_: Any
) -> None:
    """Reports progress and works until told to stop, then notes that it stopped."""
    _note(f"start {study_name} {os.getpid()}")
    deadline = time.monotonic() + WAIT_S
    step = 0
    while not should_cancel():
        assert time.monotonic() < deadline, "the worker never told the runner to stop"
        step += 1
        report(progress, "search", min(step, 999), 1000)
        time.sleep(0.01)
    _note(f"stopped {study_name} {os.getpid()}")
    check_cancel(should_cancel)


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
    return enqueue_job(engine, trials=trials, max_attempts=max_attempts)


def _job(engine: Engine, job_id: str) -> Job:
    with make_sessionmaker(engine)() as session:
        return crud.get_job(session, job_id=job_id, owner_id=None)


def _partials(settings: Settings) -> list[Path]:
    return list(settings.artifact_dir.glob(".*.partial"))


def test_a_worker_run_in_process_puts_the_signal_handlers_back(
    settings: Settings, runner_log: Path, engine_sqlite: Engine
) -> None:
    """A worker run inside another program (or a test) must not leave its SIGINT handler behind:
    Ctrl-C would then only set a stale stop flag instead of interrupting the program."""
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    _enqueue(engine_sqlite, trials=3)
    assert worker.run_worker(settings, once=True, runner=steady_runner) == 1
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


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


def path_quoting_runner(spec: JobSpec, *, cache_dir: Path, **_: Any) -> None:
    raise InputError(f"{spec.model} is not a zip; {spec.calib} is empty; scratch {cache_dir}/x")


def test_a_failed_jobs_error_names_uploads_by_file_name_not_server_path(
    settings: Settings, engine_sqlite: Engine
) -> None:
    stored = settings.upload_dir / "models" / "owner" / ("ab" * 32 + ".zip")
    data = settings.upload_dir / "datasets" / "owner" / ("cd" * 32 + ".jsonl")
    job_id = enqueue_job(
        engine_sqlite,
        trials=1,
        model=str(stored),
        model_name="my-model.zip",
        calib=str(data),
        calib_name="données.jsonl",
    )
    worker.run_worker(settings, once=True, runner=path_quoting_runner)
    error = _job(engine_sqlite, job_id).error
    assert error == "my-model.zip is not a zip; données.jsonl is empty; scratch <cache>/x"
    assert str(settings.data_dir) not in error


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


class FakeClock:
    """A monotonic clock that moves only when the runner says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_writes_are_throttled(
    settings: Settings, engine_sqlite: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[ProgressSnapshot] = []
    real = worker.set_progress

    def recording(engine: Engine, **kwargs: Any) -> bool:
        writes.append(kwargs["snapshot"])
        return real(engine, **kwargs)

    clock = FakeClock()

    def chatty_runner(spec: JobSpec, *, progress: ProgressFn, **_: Any) -> None:
        for step in range(1, 2001):
            report(progress, "analyze", step, 2000)
            clock.now += 2.0**-10  # ~1 ms a step, exact in binary: 512 steps = 0.5 s

    monkeypatch.setattr(worker, "set_progress", recording)
    job_id = _enqueue(engine_sqlite, trials=1)
    worker.run_worker(settings, once=True, runner=chatty_runner, clock=clock)
    # 2000 reports over ~2 s of the runner's clock: the first, one every PROGRESS_INTERVAL_S
    # (512 steps), and the last
    assert worker.PROGRESS_INTERVAL_S == 0.5
    done = [1, 513, 1025, 1537, 2000]
    assert [(w.stage, w.stage_progress) for w in writes] == [
        ("analyze", round(step / 2000, 3)) for step in done
    ]
    overall = [w.progress for w in writes]
    assert overall == sorted(overall) and 0 < overall[-1] < 1
    job = _job(engine_sqlite, job_id)
    assert (job.state, job.progress, job.stage_progress) == (JobState.SUCCEEDED, 1.0, 1.0)


def test_cancel_stops_a_running_job(
    settings: Settings, runner_log: Path, engine_sqlite: Engine
) -> None:
    job_id = _enqueue(engine_sqlite, trials=1)
    stop = threading.Event()
    thread = threading.Thread(
        target=worker.run_worker,
        args=(settings,),
        kwargs={"stop_event": stop, "runner": until_cancelled_runner},
    )
    thread.start()
    try:
        wait_until(
            lambda: _job(engine_sqlite, job_id).stage_progress > 0,
            "_job(engine_sqlite, job_id).stage_progress > 0",
            within_s=WAIT_S,
        )
        with make_sessionmaker(engine_sqlite)() as session:
            crud.request_cancel(session, job_id=job_id, owner_id=None)
        wait_until(
            lambda: _job(engine_sqlite, job_id).state == JobState.CANCELLED,
            "_job(engine_sqlite, job_id).state == JobState.CANCELLED",
            within_s=WAIT_S,
        )
    finally:
        stop.set()
        thread.join(timeout=WAIT_S)
    job = _job(engine_sqlite, job_id)
    assert job.lease_owner is None and job.finished_at is not None and job.eta_s is None
    assert "stopped" in runner_log.read_text()
    assert not (settings.artifact_dir / job_id).exists() and not _partials(settings)


def _take_over(engine: Engine, job_id: str, how: str) -> int:
    """Move the job's lease away from its worker, as a reaper and another worker would; the
    new holder keeps it for an hour. Returns the new lease version."""
    if how == "reclaimed":  # the lease looked expired: reaped, then claimed by another worker
        assert queue.reap_expired(engine, now=utcnow() + timedelta(hours=2)) == 1
        claimed = queue.claim_job(engine, worker_id=THIEF, lease_s=3600)
        assert claimed is not None and claimed.id == job_id
        return claimed.lease_version
    # "version moved": same owner name (a restarted worker reusing its id), newer lease
    with engine.begin() as connection:
        connection.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                lease_version=Job.lease_version + 1,
                lease_expires_at=utcnow() + timedelta(hours=1),
            )
        )
    return _job(engine, job_id).lease_version


def _thief_progress(engine: Engine, job_id: str, version: int) -> None:
    snapshot = ProgressSnapshot(
        stage="thief", stage_progress=0.125, stage_eta_s=None, progress=0.125, eta_s=None
    )
    assert queue.set_progress(engine, job_id=job_id, lease_version=version, snapshot=snapshot)


def _assert_untouched_by_the_old_holder(
    settings: Settings, engine: Engine, job_id: str, version: int
) -> None:
    job = _job(engine, job_id)
    assert (job.state, job.lease_version, job.result, job.error) == (
        JobState.RUNNING,
        version,
        None,
        None,
    )
    assert (job.stage, job.progress) == ("thief", 0.125)  # the old holder wrote nothing more
    assert not (settings.artifact_dir / job_id).exists()  # nor published its results
    assert not _partials(settings)


@pytest.mark.parametrize("how", ["reclaimed", "version moved"])
def test_worker_that_loses_its_lease_stops_and_writes_nothing(
    settings: Settings, runner_log: Path, engine_sqlite: Engine, how: str
) -> None:
    job_id = _enqueue(engine_sqlite, trials=1)
    stop = threading.Event()
    thread = threading.Thread(
        target=worker.run_worker,
        args=(settings,),
        kwargs={"stop_event": stop, "runner": until_cancelled_runner, "worker_id": "victim"},
    )
    thread.start()
    try:
        wait_until(
            lambda: _job(engine_sqlite, job_id).stage_progress > 0,
            "_job(engine_sqlite, job_id).stage_progress > 0",
            within_s=WAIT_S,
        )
        version = _take_over(engine_sqlite, job_id, how)
        _thief_progress(engine_sqlite, job_id, version)
        # the heartbeat (or the next progress write) fails, and the runner is told to stop
        wait_until(
            lambda: "stopped" in runner_log.read_text(),
            "'stopped' in runner_log.read_text()",
            within_s=WAIT_S,
        )
    finally:
        stop.set()
        thread.join(timeout=WAIT_S)
    assert not thread.is_alive()
    _assert_untouched_by_the_old_holder(settings, engine_sqlite, job_id, version)
    assert "done" not in runner_log.read_text()


def test_results_are_not_published_when_the_lease_moved_before_publishing(
    tmp_path: Path, sqlite_url: str, runner_log: Path
) -> None:
    """The runner finishes, but the lease moved after the last heartbeat: the final renewal
    before publishing fails, so the results never reach the folder the API serves."""
    # heartbeats far apart, so that the publish step, not the supervisor, notices the loss
    settings = Settings(
        database_url=sqlite_url,
        data_dir=tmp_path / "data",
        auth="off",
        lease_seconds=3600,
        heartbeat_seconds=1800,
        optuna_storage=None,
    )
    engine = make_engine(sqlite_url)
    job_id = _enqueue(engine, trials=1)
    versions: list[int] = []

    def runner_losing_its_lease_at_the_end(spec: JobSpec, **kwargs: Any) -> None:
        steady_runner(spec, **kwargs)  # writes a frontier and a plan into its staging folder
        versions.append(_take_over(engine, job_id, "reclaimed"))
        _thief_progress(engine, job_id, versions[0])

    try:
        ran = worker.run_worker(settings, once=True, runner=runner_losing_its_lease_at_the_end)
        assert ran == 1 and len(versions) == 1
        assert _job(engine, job_id).lease_owner == THIEF
        assert f"done bitplan-{job_id}" in runner_log.read_text()  # it finished, unpublished
        _assert_untouched_by_the_old_holder(settings, engine, job_id, versions[0])
    finally:
        engine.dispose()


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
        wait_until(
            _running_with_progress(engine, job_id, proc),
            "_running_with_progress(engine, job_id, proc)",
            within_s=WAIT_S,
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=WAIT_S)
    dead = _job(engine, job_id)
    assert dead.state == "running" and dead.attempts == 1
    # Nobody releases the job: it comes back only when its lease has run out.
    just_before = dead.lease_expires_at - timedelta(milliseconds=1)
    assert queue.reap_expired(engine, now=just_before) == 0
    assert queue.claim_job(engine, worker_id="other", lease_s=1) is None
    wait_until(
        lambda: worker.run_worker(settings, once=True, runner=steady_runner) == 1,
        "worker.run_worker(settings, once=True, runner=steady_runner) == 1",
        within_s=WAIT_S,
    )
    job = _job(engine, job_id)
    assert (job.state, job.attempts, job.lease_version) == ("succeeded", 2, 2)
    lines = runner_log.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["start", "start", "done"]
    # The retry runs its own Optuna study, never the killed attempt's (with its RUNNING trials).
    first, second = (worker.study_name_for(job_id, attempt=n) for n in (1, 2))
    assert [line.split()[1] for line in lines] == [first, second, second]
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
        wait_until(
            _running_with_progress(engine, job_id, proc),
            "_running_with_progress(engine, job_id, proc)",
            within_s=WAIT_S,
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    job = _job(engine, job_id)
    assert (job.state, job.attempts, job.lease_owner) == ("queued", 0, None)
    assert "done" not in runner_log.read_text()
    engine.dispose()
