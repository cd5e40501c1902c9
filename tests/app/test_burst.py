"""A burst of concurrent submissions against a real server: backpressure, never errors.

The API runs under uvicorn in its own process with API keys on and two worker processes whose
runner returns at once, on SQLite and on PostgreSQL. :data:`BURST` clients submit at the same
moment; every answer must be a 202, or a 429/503 problem+json with ``Retry-After`` (the server
shedding load), never a 500. Every accepted job must then exist exactly once and succeed exactly
once, and the workers must still be alive. The figures (accepted, p50/p99 submit latency, drain
time) are logged for the record (``pytest -o log_cli=true``).
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select

from bitplan.app import crud, worker
from bitplan.app.db import make_engine, make_sessionmaker
from bitplan.app.models import Job
from bitplan.app.settings import Settings
from bitplan.search.spec import JobSpec

log = logging.getLogger(__name__)

BURST = 100  # concurrent submissions (the figure)
WORKERS = 2
WAIT_S = 60.0  # generous bound on server start-up and on the queue draining
LOG_ENV = "BITPLAN_TEST_BURST_LOG"  # where the runner double notes each job it ran
SHED = {429, 503}  # the statuses of a server shedding load


def instant_runner(spec: JobSpec, *, out_dir: Path, study_name: str, **_: Any) -> None:
    """Stands in for run_job: notes the job and writes an (empty) result folder at once."""
    (out_dir / "plans").mkdir()
    with open(os.environ[LOG_ENV], "a") as note:
        note.write(f"{study_name}\n")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the API process exited during start-up"
        try:
            httpx.get(f"{url}/openapi.json", timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"the API did not answer within {WAIT_S} s")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def service(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, str, Settings, list[subprocess.Popen[bytes]]]]:
    """(url, API key, settings, worker processes) of a live API with keys on and two workers."""
    port = _free_port()
    settings = Settings(
        database_url=db_url,
        data_dir=tmp_path / "data",
        auth="on",
        host="127.0.0.1",
        port=port,
        lease_seconds=5.0,
        heartbeat_seconds=1.0,
        poll_seconds=0.1,
        workers=0,
        optuna_storage="",
        worker_runner=f"{Path(__file__).stem}:instant_runner",
    )
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as session:
        _, key = crud.create_api_key(session, name="burst")
    engine.dispose()
    here, root = Path(__file__).resolve().parent, Path(__file__).resolve().parents[2]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(here), str(root)]))
    monkeypatch.setenv(LOG_ENV, str(tmp_path / "ran.log"))
    env = {**os.environ, **worker._settings_env(settings)}
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bitplan.app.main:create_app", "--factory"]
        + ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env,
    )
    workers = worker.spawn_workers(settings, count=WORKERS)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_up(url, api)
        yield url, key, settings, workers
    finally:
        _stop([api, *workers])


def _submit_all(url: str, key: str) -> list[tuple[httpx.Response, float]]:
    """BURST submissions released at the same instant, each on its own connection;
    (answer, seconds) each."""
    start = threading.Barrier(BURST)
    answers: list[tuple[httpx.Response, float]] = []
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    headers = {"Authorization": f"Bearer {key}"}

    def submit(http: httpx.Client, n: int) -> None:
        body = {"model": "builtin:digits-cnn", "budget": "4.5bpw", "method": "weight", "seed": n}
        start.wait()
        began = time.perf_counter()
        answer = http.post("/v1/jobs", json=body)
        took = time.perf_counter() - began
        with lock:
            answers.append((answer, took))

    with httpx.Client(base_url=url, timeout=WAIT_S, limits=limits, headers=headers) as http:
        threads = [threading.Thread(target=submit, args=(http, n)) for n in range(BURST)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S)
    return answers


def _count_jobs(engine: Engine, *, state: str | None = None) -> int:
    query = select(func.count()).select_from(Job)
    if state is not None:
        query = query.where(Job.state == state)
    with engine.connect() as connection:
        return int(connection.scalar(query) or 0)


@pytest.mark.timeout(120)
def test_a_burst_is_answered_with_202_or_backpressure_and_every_job_runs_once(
    service: tuple[str, str, Settings, list[subprocess.Popen[bytes]]],
    engine: Engine,
    tmp_path: Path,
) -> None:
    url, key, _settings, workers = service
    answers = _submit_all(url, key)
    assert len(answers) == BURST
    for answer, _took in answers:
        assert answer.status_code == 202 or answer.status_code in SHED, answer.text
        if answer.status_code in SHED:
            assert answer.headers["content-type"].startswith("application/problem+json")
            assert int(answer.headers["Retry-After"]) >= 1
    accepted = [answer.json()["id"] for answer, _ in answers if answer.status_code == 202]
    assert len(set(accepted)) == len(accepted)
    assert _count_jobs(engine) == len(accepted)

    drain_began = time.perf_counter()
    deadline = time.monotonic() + WAIT_S
    while _count_jobs(engine, state="succeeded") < len(accepted):
        assert time.monotonic() < deadline, "the accepted jobs did not all succeed"
        assert all(proc.poll() is None for proc in workers), "a worker died"
        time.sleep(0.2)
    drain_s = time.perf_counter() - drain_began
    ran = (tmp_path / "ran.log").read_text().split()
    assert accepted, "the burst was shed entirely"
    # each exactly once, in its first attempt
    assert sorted(ran) == sorted(worker.study_name_for(job_id, attempt=1) for job_id in accepted)
    assert all(proc.poll() is None for proc in workers)

    latencies = sorted(took for _, took in answers)
    log.warning(
        "burst on %s: %d of %d accepted, %d shed; submit p50 %.3f s, p99 %.3f s; drain %.1f s",
        engine.dialect.name,
        len(accepted),
        BURST,
        BURST - len(accepted),
        statistics.median(latencies),
        latencies[int(0.99 * (len(latencies) - 1))],
        drain_s,
    )
