"""Chaos: SIGKILL workers, and ``bitplan serve`` itself, while 30 jobs run; every job still
succeeds, each published once, and nothing is left on disk.

A real ``bitplan serve`` (SQLite in a temporary data folder, 2 supervised workers, 2-second
leases so a dead worker's job comes back quickly, a sweep every second) runs the jobs of
``_chaos_runner``, about a second of work each. While they run the test SIGKILLs a worker in the
middle of a job six times and ``serve`` twice (once with an upload in flight), restarting it
each time; its workers must die with it. Victims and moments come from a seeded generator;
every wait polls a condition with a deadline.

The jobs stand in for the pipeline: a real job (builtin model, 2 trials) was still running 44 s
after it started in a fresh worker on a loaded 2-core machine, and every kill starts a fresh
worker, so real jobs belong to the pipeline's own tests, not to this one.

Afterwards every job has succeeded within its attempts; each job's folder holds the output of
exactly one finished execution, the one that held the job's final lease; after a final sweep no
temporary file or folder is left and every stored upload has its row. The figures (kills,
reclaims, executions) and what each sweep removed are printed (``pytest -s``) and logged, so a
failing run's report shows them.
"""

from __future__ import annotations

import http.client
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from bitplan.app.db import make_engine, make_sessionmaker
from bitplan.app.models import Blob, Job
from bitplan.app.settings import Settings
from bitplan.app.states import TERMINAL_STATES, JobState
from bitplan.app.sweeper import sweep_settings
from tests.app._chaos_runner import LOG_ENV, TOKEN_FILE
from tests.helpers import process_gone, wait_until

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("chaos")

SEED = 20240607  # the kill schedule's generator: victims and pauses
N_JOBS = 30
STEPS = 10  # a job works 10 steps of _chaos_runner.STEP_S (0.1 s): 1 s, so kills land mid-job
MAX_ATTEMPTS = 4
# A worker is killed only while its job has used at most this many attempts, so even a job
# claimed again in the instant between the check and the kill keeps one attempt to succeed.
KILLABLE_ATTEMPTS = MAX_ATTEMPTS - 2
# The order of the kills: W = a worker in the middle of a job, S = serve (U: with an upload
# in flight too). Six worker kills and two of serve, as the chaos the service must survive.
SCHEDULE = "WWUWWSWW"
PAUSE_S = (0.2, 1.0)  # a random pause before each kill
WAIT_S = 90.0  # the deadline of any one wait: far beyond a healthy run on a loaded machine
DIE_WITH_PARENT_S = 10.0  # workers of a SIGKILLed serve exit within this (their promise)
POLL_S = 0.1
UPLOAD_BYTES = 1 << 20  # the upload left in flight: announced in full, sent only in part


def _worker_id(pid: int) -> str | None:
    """The ``--worker-id`` a supervised worker was started with (None: not a worker)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except (FileNotFoundError, ProcessLookupError):
        return None
    return args[args.index("--worker-id") + 1] if "--worker-id" in args else None


@dataclass
class Serve:
    """``bitplan serve`` as a process, started again after each kill; a log file per run."""

    env: dict[str, str]
    port: int
    folder: Path
    runs: int = 0
    process: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)
    tied: list[int] = field(default_factory=list)  # workers of killed runs, which must exit

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.runs += 1
        path = self.folder / f"serve-{self.runs}.log"
        self.logs.append(path)
        command = [sys.executable, "-m", "bitplan.app.cli", "serve"]
        command += ["--port", str(self.port), "--workers", "2"]
        with path.open("wb") as out:
            self.process = subprocess.Popen(command, env=self.env, cwd=ROOT, stdout=out, stderr=out)
        wait_until(self._healthy, "serve answers /v1/health", within_s=WAIT_S)

    def _healthy(self) -> bool:
        assert self.process is not None and self.process.poll() is None, "serve exited"
        try:
            return httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def workers(self) -> dict[int, str]:
        """pid → worker id of this serve's live workers."""
        assert self.process is not None
        found = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        ids = {int(pid): _worker_id(int(pid)) for pid in found}
        return {pid: wid for pid, wid in ids.items() if wid is not None and not process_gone(pid)}

    def kill(self) -> list[int]:
        """SIGKILL serve; returns the pids its workers had."""
        assert self.process is not None
        tied = list(self.workers())
        self.tied += tied
        self.process.kill()
        self.process.wait()
        return tied

    def stop(self) -> None:
        """SIGTERM serve (it stops its workers); kill what a failed test left running."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in self.tied:  # only a worker that broke its promise to die with serve
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)

    def log_lines(self, needle: str) -> list[str]:
        return [
            line.strip()
            for path in self.logs
            for line in path.read_text(errors="replace").splitlines()
            if needle in line
        ]


def _jobs(engine: Engine) -> list[Job]:
    with Session(engine) as session:
        return list(session.scalars(select(Job)))


def _victim(serve: Serve, engine: Engine, rng: random.Random) -> int | None:
    """A worker of ``serve`` in the middle of a job that may lose one more attempt."""
    workers = serve.workers()
    busy = {
        job.lease_owner
        for job in _jobs(engine)
        if job.state == JobState.RUNNING and job.progress > 0 and job.attempts <= KILLABLE_ATTEMPTS
    }
    candidates = sorted(pid for pid, worker_id in workers.items() if worker_id in busy)
    return rng.choice(candidates) if candidates else None


def _wait_for_victim(serve: Serve, engine: Engine, rng: random.Random) -> int:
    deadline = time.monotonic() + WAIT_S
    while (pid := _victim(serve, engine, rng)) is None:
        assert time.monotonic() < deadline, f"no worker in the middle of a job for {WAIT_S} s"
        time.sleep(POLL_S)
    return pid


def _upload_in_flight(serve: Serve, upload_dir: Path) -> threading.Thread:
    """Start an upload that announces UPLOAD_BYTES and sends a tenth of them, then waits for
    the server to die; returns once the server has begun writing its ``.part`` file."""
    boundary = "chaosboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    line = b'{"text": "chaos"}\n'
    body = line * (UPLOAD_BYTES // len(line))
    connection = http.client.HTTPConnection("127.0.0.1", serve.port, timeout=WAIT_S)
    connection.putrequest("POST", "/v1/datasets")
    connection.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
    connection.putheader("Content-Length", str(len(head) + len(body) + len(tail)))
    connection.endheaders()
    connection.send(head + body[: len(body) // 10])

    def hang_on() -> None:
        try:
            connection.getresponse()  # never comes: the server is killed first
        except (OSError, http.client.HTTPException):
            pass
        finally:
            connection.close()

    waiter = threading.Thread(target=hang_on, daemon=True)
    waiter.start()
    wait_until(
        lambda: any(upload_dir.rglob(".upload-*.part")), "the upload's .part file", within_s=WAIT_S
    )
    return waiter


def _leftovers(data_dir: Path) -> list[Path]:
    patterns = ("**/.upload-*.part", "**/.validate-*", "**/.unzip-*", "**/*.partial")
    return sorted(path for pattern in patterns for path in data_dir.glob(pattern))


@pytest.fixture
def chaos_env(tmp_path: Path) -> tuple[Settings, dict[str, str]]:
    """Settings of the service under test and the environment that gives them to ``serve``."""
    data = tmp_path / "data"
    env = {
        **os.environ,
        "BITPLAN_DATA_DIR": str(data),
        "BITPLAN_DATABASE_URL": f"sqlite:///{data / 'bitplan.db'}",
        # A private cache: the sweeps judge its extraction folders, not the tests' model cache.
        "BITPLAN_CACHE_DIR": str(data / "cache"),
        "BITPLAN_AUTH": "off",
        "BITPLAN_WORKER_RUNNER": "_chaos_runner:run",
        "BITPLAN_LEASE_SECONDS": "2",
        "BITPLAN_HEARTBEAT_SECONDS": "0.5",
        "BITPLAN_POLL_SECONDS": "0.1",
        "BITPLAN_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "BITPLAN_SWEEP_INTERVAL_S": "1",
        "BITPLAN_OPTUNA_STORAGE": "",
        LOG_ENV: str(tmp_path / "executions.log"),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "app"), str(ROOT)]),
        "COLUMNS": "1000",  # the CLI's log lines stay one line each in the log files
    }
    settings = Settings(database_url=env["BITPLAN_DATABASE_URL"], data_dir=data, auth="off")
    settings = settings.model_copy(update={"cache_dir": data / "cache"})
    return settings, env


def _submit(serve: Serve) -> list[str]:
    with httpx.Client(base_url=serve.url, timeout=30) as client:
        upload = client.post("/v1/datasets", files={"file": ("d.jsonl", b'{"text": "hi"}\n')})
        assert upload.status_code == 201, upload.text
        dataset = upload.json()["id"]
        ids = []
        for n in range(N_JOBS):
            body: dict[str, Any] = {"model": "builtin:digits-cnn", "budget": "4.5bpw"}
            body |= {"trials": STEPS, "calib": dataset if n % 4 == 0 else "builtin"}
            answer = client.post("/v1/jobs", json=body)
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["id"])
    return ids


def _executions(path: Path) -> list[list[str]]:
    """``[event, job, lease, pid, token]`` per line of the runner's log."""
    return [line.split() for line in path.read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as sock:  # bind to 0, read the port, let go
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wreak_chaos(serve: Serve, engine: Engine, upload_dir: Path) -> Counter[str]:
    """Run :data:`SCHEDULE` against ``serve``; returns how many workers and serves it killed."""
    rng = random.Random(SEED)
    killed: Counter[str] = Counter()
    for event in SCHEDULE:
        time.sleep(rng.uniform(*PAUSE_S))
        if event == "U":
            _upload_in_flight(serve, upload_dir)
        victim = _wait_for_victim(serve, engine, rng)  # serve, too, dies in the middle of a job
        if event == "W":
            os.kill(victim, signal.SIGKILL)
            killed["worker"] += 1
            continue
        tied = serve.kill()
        killed["serve"] += 1
        serve.start()
        for pid in tied:
            wait_until(
                lambda pid=pid: process_gone(pid),
                f"worker {pid} exited",
                within_s=DIE_WITH_PARENT_S,
            )
    return killed


def test_jobs_survive_killed_workers_and_a_killed_serve(
    chaos_env: tuple[Settings, dict[str, str]], tmp_path: Path
) -> None:
    settings, env = chaos_env
    began = time.monotonic()
    serve = Serve(env=env, port=_free_port(), folder=tmp_path)
    engine = make_engine(settings.database_url)
    try:
        serve.start()
        job_ids = _submit(serve)
        killed = _wreak_chaos(serve, engine, settings.upload_dir)
        wait_until(
            lambda: all(job.state in TERMINAL_STATES for job in _jobs(engine)),
            "all jobs ended",
            within_s=WAIT_S,
        )
        serve.stop()
        elapsed = time.monotonic() - began
        final_sweep = sweep_settings(settings, make_sessionmaker(engine))
        jobs = {job.id: job for job in _jobs(engine)}
        with Session(engine) as session:
            rows = set(session.scalars(select(Blob.path)))
    finally:
        serve.stop()
        engine.dispose()
    runs = _executions(Path(env[LOG_ENV]))
    finishes = {run[4]: run for run in runs if run[0] == "finish"}
    sweeps = serve.log_lines("sweep removed")
    figures = (
        f"chaos: {N_JOBS} jobs in {elapsed:.0f} s; killed {killed['worker']} "
        f"workers mid-job and serve {killed['serve']} times ({serve.runs} serve runs); "
        f"{len(serve.log_lines('reaped job'))} reclaims after expired leases; "
        f"{sum(run[0] == 'start' for run in runs)} executions started, {len(finishes)} finished; "
        f"attempts {sum(job.attempts for job in jobs.values())} in all, "
        f"at most {max(job.attempts for job in jobs.values())} for one job; the sweeps "
        f"while serving removed {len(sweeps)}, the final sweep {len(final_sweep)}"
    )
    for line in [figures, *sweeps, *(f"final sweep removed {p}" for p in final_sweep.paths)]:
        print(line)  # noqa: T201 -- the figures a reader of `pytest -s` came for
        log.warning(line)

    assert killed == Counter(worker=SCHEDULE.count("W"), serve=len(SCHEDULE) - SCHEDULE.count("W"))
    assert sorted(jobs) == sorted(job_ids)
    failed = {
        job_id: (job.state, job.error) for job_id, job in jobs.items() if job.state != "succeeded"
    }
    assert failed == {}
    assert all(1 <= job.attempts <= MAX_ATTEMPTS for job in jobs.values())
    published = sorted(p.name for p in settings.artifact_dir.iterdir())
    assert published == sorted(job_ids)  # one folder a job, and nothing else
    for job_id, job in jobs.items():
        token = (settings.artifact_dir / job_id / TOKEN_FILE).read_text()
        _, ran_job, lease, _, _ = finishes[token]  # the output of one finished execution ...
        assert (ran_job, int(lease)) == (job_id, job.lease_version)  # ... of the final lease
        assert job.result is not None and job.result["artifact_dir"].endswith(job_id)
    assert _leftovers(settings.data_dir) == []
    stored = {
        str(path.resolve())
        for kind in ("models", "datasets")
        for path in (settings.upload_dir / kind).glob("*/*")
    }
    assert stored <= rows  # no stored file without its row
    assert any(".upload-" in line for line in sweeps)  # the upload cut off by the kill was swept
