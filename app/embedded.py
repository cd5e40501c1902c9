"""Running the service on this machine: the API on a background thread plus worker processes.

:func:`embedded_service` is what ``bitplan demo`` and the tests run (migrations, the API on a
free loopback port, ``workers`` supervised worker processes, everything stopped on the way
out); ``bitplan serve`` uses :func:`exit_on_sigterm` and the supervisor
(:mod:`bitplan.app.supervisor`, which stops its workers with :func:`stop_workers`) around its
own foreground API. This module sits below the CLI and the demo and imports neither, so nothing
here can form an import cycle with them.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from bitplan.app.settings import Settings
from bitplan.sensitivity.errors import InputError

__all__ = ["STOP_GRACE_S", "embedded_service", "exit_on_sigterm", "stop_workers"]

logger = logging.getLogger(__name__)

# Seconds a worker gets to release its job after SIGTERM before it is killed, and the API to
# finish its requests: long enough for one database write, short enough for a person waiting.
STOP_GRACE_S = 10.0
_STARTUP_TIMEOUT_S = 30.0  # the API thread must be listening by then
_STARTUP_POLL_S = 0.05  # how often the start-up wait looks at the API thread


def _exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> None:
    """Make SIGTERM raise ``SystemExit(143)``, so ``finally`` blocks (stopping the workers) run.

    uvicorn re-raises the signal that stopped it once it has shut down; with the default SIGTERM
    action that would end the process before the workers are stopped.
    """
    signal.signal(signal.SIGTERM, _exit_on_signal)


def stop_workers(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every worker (each releases its job to the queue), then kill stragglers."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            logger.warning("worker %d ignored SIGTERM; killing it", process.pid)
            process.kill()
            process.wait()


@contextmanager
def embedded_service(
    settings: Settings, *, workers: int = 1, worker_log: Path | None = None
) -> Iterator[str]:
    """Migrate, serve the API on a background thread and start ``workers`` worker processes;
    yields the API's base URL and stops everything on exit (Ctrl-C and errors included).

    ``settings.port`` 0 picks a free port. ``worker_log`` receives the workers' output, so it
    does not tear through a progress bar on this terminal.
    """
    import uvicorn

    from bitplan.app.db import upgrade_database
    from bitplan.app.main import create_app
    from bitplan.app.supervisor import WorkerSupervisor

    upgrade_database(settings.database_url)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=int(STOP_GRACE_S),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="bitplan-api", daemon=True)
    thread.start()
    supervisor: WorkerSupervisor | None = None
    try:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise InputError(f"the API could not listen on {settings.host}:{settings.port}")
            time.sleep(_STARTUP_POLL_S)
        port = server.servers[0].sockets[0].getsockname()[1]
        supervisor = WorkerSupervisor(
            settings.model_copy(update={"port": port}), count=workers, log_path=worker_log
        )
        supervisor.start()
        yield f"http://{settings.host}:{port}"
    finally:
        if supervisor is not None:
            supervisor.stop()
        server.should_exit = True
        thread.join(STOP_GRACE_S)
