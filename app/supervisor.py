"""The worker supervisor of ``bitplan serve``: keeps ``count`` worker processes running.

A background thread reaps each worker that exits (so none stays ``<defunct>``), logs how it
ended (exit code or signal) and starts a replacement within :data:`SUPERVISE_POLL_S` — unless
the slot spent its :class:`RestartBudget` (a worker that keeps crashing, e.g. on a database it
cannot reach): then the supervisor logs an error and leaves that slot empty, and readiness
(``/v1/health/ready``) reports the missing workers. The dead worker's presence row is deleted
at once, so the API's count of live workers is right without waiting for it to go stale.

Workers are spawned by the supervisor thread itself and are started through
:mod:`bitplan.app.supervised_worker`, which ties them to this process: Linux delivers the
parent-death signal when the *thread* that forked a child exits, so all spawning happens on the
one thread that lives until the workers are stopped.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from bitplan.app.db import make_engine
from bitplan.app.embedded import stop_workers
from bitplan.app.settings import Settings
from bitplan.app.worker_presence import forget_worker

__all__ = [
    "SUPERVISE_POLL_S",
    "RestartBudget",
    "Spawn",
    "WorkerSupervisor",
    "describe_exit",
]

logger = logging.getLogger(__name__)

# How often the supervisor looks for dead workers: a dead worker is replaced well within 10 s.
SUPERVISE_POLL_S = 0.5

# Starts one worker process with this worker id.
Spawn = Callable[[str], "subprocess.Popen[bytes]"]


@dataclass
class RestartBudget:
    """At most ``max_restarts`` restarts of one slot within any ``window_s`` seconds."""

    max_restarts: int = 5
    window_s: float = 60.0
    _recent: deque[float] = field(default_factory=deque, repr=False)

    def spend(self, now: float) -> bool:
        """Record a restart at ``now``; False (nothing recorded) when the budget is spent."""
        while self._recent and now - self._recent[0] >= self.window_s:
            self._recent.popleft()
        if len(self._recent) >= self.max_restarts:
            return False
        self._recent.append(now)
        return True


def describe_exit(returncode: int) -> str:
    """``'exit code 3'`` or ``'signal SIGKILL'`` (Popen reports a signal as a negative code)."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


@dataclass
class _Slot:
    index: int
    budget: RestartBudget
    generation: int = 0
    worker_id: str = ""
    process: subprocess.Popen[bytes] | None = None


class WorkerSupervisor:
    """Run ``count`` workers for ``settings``; :meth:`start` and :meth:`stop` bracket serving.

    ``spawn`` (tests hand in their own) starts one worker for a worker id; ``clock`` (monotonic
    seconds) times the restart budget. :meth:`spawn_all` and :meth:`check` are the steps of the
    thread, callable one at a time; :meth:`close` releases the database engine.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        count: int,
        log_path: Path | None = None,
        spawn: Spawn | None = None,
        budget: Callable[[], RestartBudget] = RestartBudget,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings, self.log_path, self.clock = settings, log_path, clock
        self._spawn = spawn or self._spawn_worker
        self._engine = make_engine(settings.database_url)  # connects on first use only
        self.slots = [_Slot(index=i, budget=budget()) for i in range(count)]
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bitplan-supervisor", daemon=True)
        self._prefix = f"{socket.gethostname()}:{os.getpid()}"

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [slot.process for slot in self.slots if slot.process is not None]

    def alive(self) -> int:
        """How many workers are running now."""
        return sum(1 for process in self.processes if process.poll() is None)

    def _spawn_worker(self, worker_id: str) -> subprocess.Popen[bytes]:
        from bitplan.app.worker import _settings_env

        command = [sys.executable, "-m", "bitplan.app.supervised_worker"]
        command += ["--parent", str(os.getpid()), "--worker-id", worker_id]
        env = {**os.environ, **_settings_env(self.settings)}
        if self.log_path is None:
            return subprocess.Popen(command, env=env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(command, env=env, stdout=log, stderr=log)

    def _start(self, slot: _Slot) -> subprocess.Popen[bytes]:
        slot.generation += 1
        slot.worker_id = f"{self._prefix}/w{slot.index}.{slot.generation}"
        slot.process = self._spawn(slot.worker_id)
        return slot.process

    def spawn_all(self) -> None:
        for slot in self.slots:
            self._start(slot)

    def check(self) -> None:
        """Reap every worker that exited and restart it, while its slot's budget allows."""
        for slot in self.slots:
            if slot.process is None or slot.process.poll() is None:
                continue
            dead, dead_id = slot.process, slot.worker_id
            how = describe_exit(dead.returncode)
            self._forget(dead_id)
            if self._stop.is_set():
                return
            if not slot.budget.spend(self.clock()):
                logger.error(
                    "worker %s (pid %d) died (%s); it was restarted %d times within %.0f s, "
                    "giving up on it: %d of %d workers left",
                    dead_id,
                    dead.pid,
                    how,
                    slot.budget.max_restarts,
                    slot.budget.window_s,
                    self.alive(),
                    len(self.slots),
                )
                slot.process = None
                continue
            replacement = self._start(slot)
            logger.warning(
                "worker %s (pid %d) died (%s); restarted as %s (pid %d)",
                dead_id,
                dead.pid,
                how,
                slot.worker_id,
                replacement.pid,
            )

    def start(self) -> None:
        """Start the workers and the supervising thread; returns once the workers are spawned."""
        self._thread.start()
        self._started.wait()

    def stop(self) -> None:
        """Stop supervising, SIGTERM the workers (each releases its job) and reap them."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            self.spawn_all()
        finally:
            self._started.set()
        try:
            while not self._stop.wait(SUPERVISE_POLL_S):
                self.check()
        finally:
            stop_workers(self.processes)
            self.close()

    def _forget(self, worker_id: str) -> None:
        """Delete a dead worker's presence row (it cannot any more); errors are only logged."""
        try:
            forget_worker(self._engine, worker_id)
        except SQLAlchemyError as exc:
            logger.warning("could not remove the presence row of worker %s: %s", worker_id, exc)

    def close(self) -> None:
        self._engine.dispose()
