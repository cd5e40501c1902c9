"""The supervisor of ``bitplan serve``: dead workers are reaped and replaced (within a restart
budget, with a log line each), their presence rows go, and workers die with their parent.

Deadlines below are upper bounds the service promises (a dead worker is replaced within 10 s),
polled for, never sleeps that a slow machine could overrun."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from bitplan.app.db import make_engine
from bitplan.app.models import WorkerBeat
from bitplan.app.settings import Settings
from bitplan.app.supervisor import RestartBudget, WorkerSupervisor, describe_exit
from bitplan.app.worker_presence import count_alive, record_beat
from tests.helpers import process_gone, wait_until

HERE, ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parents[2]
REPLACED_WITHIN_S = 10.0  # the promise: a dead worker is replaced within 10 s


def idle_runner(*_: Any, **__: Any) -> None:
    """A job runner for worker processes that never get a job here."""


def _sleeper(_worker_id: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


@pytest.fixture
def sleepers(settings: Settings) -> Iterator[Callable[..., WorkerSupervisor]]:
    """Supervisors whose "workers" are sleeping processes, driven step by step (no thread)."""
    made: list[WorkerSupervisor] = []

    def make(count: int, **kwargs: Any) -> WorkerSupervisor:
        supervisor = WorkerSupervisor(settings, count=count, spawn=_sleeper, **kwargs)
        made.append(supervisor)
        supervisor.spawn_all()
        return supervisor

    yield make
    for supervisor in made:
        supervisor.stop()  # not started: only marks it stopped
        for process in supervisor.processes:
            process.kill()
            process.wait()
        supervisor.close()


def _kill(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait()  # so the next check sees it dead, as the supervisor's poll would


def test_restart_budget_allows_n_restarts_per_window() -> None:
    budget = RestartBudget(max_restarts=2, window_s=10.0)
    assert budget.spend(0.0) and budget.spend(1.0)
    assert not budget.spend(2.0)
    assert budget.spend(10.5)  # the first restart left the window
    assert not budget.spend(10.6)


def test_exits_are_described_by_code_or_signal() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"


def test_a_killed_worker_is_reaped_replaced_and_logged(
    sleepers: Callable[..., WorkerSupervisor], caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = sleepers(2)
    victim, other = supervisor.processes
    _kill(victim)
    with caplog.at_level(logging.WARNING, logger="bitplan.app.supervisor"):
        supervisor.check()
    assert supervisor.alive() == 2
    assert victim not in supervisor.processes and other in supervisor.processes
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"pid {victim.pid}" in line and "signal SIGKILL" in line and "restarted" in line


def test_a_dead_workers_presence_row_is_removed(
    settings: Settings, sleepers: Callable[..., WorkerSupervisor]
) -> None:
    supervisor = sleepers(1)
    engine = make_engine(settings.database_url)
    try:
        dead_id = supervisor.slots[0].worker_id
        record_beat(engine, dead_id)
        _kill(supervisor.processes[0])
        supervisor.check()
        with Session(engine) as session:
            assert session.scalars(select(WorkerBeat.id)).all() == []
            assert count_alive(session, within_s=settings.lease_seconds) == 0
    finally:
        engine.dispose()


def test_a_crash_looping_worker_is_given_up_loudly(
    sleepers: Callable[..., WorkerSupervisor], caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = sleepers(
        2, budget=lambda: RestartBudget(max_restarts=1, window_s=60.0), clock=lambda: 0.0
    )
    _kill(supervisor.processes[0])
    supervisor.check()  # first death: restarted
    _kill(supervisor.slots[0].process)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="bitplan.app.supervisor"):
        supervisor.check()  # second death within the window: the budget is spent
    assert supervisor.slots[0].process is None
    assert supervisor.alive() == 1  # the other slot runs on
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "giving up" in line and "signal SIGKILL" in line and "1 of 2 workers left" in line
    supervisor.check()  # an empty slot stays empty, without another line
    assert supervisor.alive() == 1


def _worker_settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Real worker processes on the test database with :func:`idle_runner` as their runner."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), str(ROOT)]))
    return settings.model_copy(update={"worker_runner": f"{Path(__file__).stem}:idle_runner"})


def _alive_in_db(settings: Settings) -> int:
    engine = make_engine(settings.database_url)
    try:
        with Session(engine) as session:
            return count_alive(session, within_s=settings.lease_seconds)
    finally:
        engine.dispose()


def test_real_workers_are_replaced_within_10_s_and_report_in_the_database(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = _worker_settings(settings, monkeypatch)
    supervisor = WorkerSupervisor(settings, count=2, log_path=tmp_path / "workers.log")
    supervisor.start()
    try:
        wait_until(lambda: _alive_in_db(settings) == 2, within_s=60, what="2 workers reported")
        victim = supervisor.processes[0]
        os.kill(victim.pid, signal.SIGKILL)
        wait_until(
            lambda: victim not in supervisor.processes and supervisor.alive() == 2,
            within_s=REPLACED_WITHIN_S,
            what="the killed worker was replaced",
        )
        assert process_gone(victim.pid)  # reaped, not left <defunct>
        wait_until(
            lambda: _alive_in_db(settings) == 2, within_s=60, what="the replacement reported"
        )
        survivors = supervisor.processes
    finally:
        supervisor.stop()
    assert all(process.returncode is not None for process in survivors)
    assert _alive_in_db(settings) == 0  # stopped workers delete their rows


# A child that ties itself to its parent (the test's intermediate process), then waits.
_CHILD = """
import os, sys, time
from bitplan.app import supervised_worker
if sys.argv[1] == "fallback":  # no prctl: only the getppid() poll can notice the parent's death
    supervised_worker._set_parent_death_signal = lambda signum: False
supervised_worker.die_with_parent(os.getppid(), poll_s=0.1)
print(os.getpid(), flush=True)
time.sleep(120)
"""
# The intermediate: starts the child, passes on its pid, waits to be killed.
_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE)
print(child.stdout.readline().decode().strip(), flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("how", ["pdeathsig", "fallback"])
def test_a_worker_dies_with_its_parent(how: str) -> None:
    if how == "pdeathsig" and not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only; the fallback case covers other systems")
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, _CHILD, how], stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert not process_gone(child_pid)
        parent.kill()  # SIGKILL: the parent gets no chance to stop its child
        parent.wait()
        wait_until(lambda: process_gone(child_pid), within_s=10, what="the orphan exited")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_sigkill_of_serve_takes_its_workers_down(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = _worker_settings(settings, monkeypatch)
    monkeypatch.setenv("BITPLAN_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("BITPLAN_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("BITPLAN_WORKER_RUNNER", settings.worker_runner)
    monkeypatch.setenv("BITPLAN_AUTH", "off")
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "bitplan.app.cli", "serve", "--port", "0", "--workers", "2"],
        stdout=log,
        stderr=log,
    )
    try:
        wait_until(
            lambda: _alive_in_db(settings) == 2, within_s=60, what="serve's workers reported"
        )
        workers = [int(pid) for pid in _children(serve.pid)]
        assert len(workers) == 2
        serve.kill()
        serve.wait()
        for pid in workers:
            wait_until(lambda pid=pid: process_gone(pid), within_s=10, what=f"worker {pid} exited")
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        log.close()


def _children(pid: int) -> list[str]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return found.stdout.split()
