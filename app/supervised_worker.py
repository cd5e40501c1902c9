"""A worker process that dies with its parent: what ``bitplan serve`` starts.

A worker orphaned by a SIGKILLed ``serve`` would keep claiming jobs nobody supervises. On Linux
the kernel sends the worker SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``); the
worker then releases its job like on any SIGTERM. As a fallback (other systems, or a parent
that died before the ``prctl`` took effect) a thread polls ``getppid()`` and, once the parent
is gone, sends that SIGTERM itself and, after :data:`~bitplan.app.embedded.STOP_GRACE_S`, exits
hard. Standalone workers (``bitplan worker``) are not tied to the shell that started them.

Run as ``python -m bitplan.app.supervised_worker --parent PID [worker options]``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from bitplan.app.embedded import STOP_GRACE_S

__all__ = ["PARENT_POLL_S", "die_with_parent", "main"]

logger = logging.getLogger(__name__)

PARENT_POLL_S = 1.0  # how often the fallback looks whether the parent is still there
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _set_parent_death_signal(signum: int) -> bool:
    """Ask the Linux kernel for ``signum`` when the parent dies; False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def _watch_parent(parent_pid: int, poll_s: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    logger.warning("parent process %d is gone; stopping this worker", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)  # releases the current job, like any SIGTERM
    time.sleep(STOP_GRACE_S)
    logger.error("worker did not stop %.0f s after its parent died; exiting", STOP_GRACE_S)
    os._exit(1)


def die_with_parent(parent_pid: int, *, poll_s: float = PARENT_POLL_S) -> None:
    """Make this process get SIGTERM once ``parent_pid`` (its parent) is gone.

    Call it first thing in the child, with the pid the parent had when it spawned the child:
    if the parent already died, the child was re-parented and stops right away.
    """
    _set_parent_death_signal(signal.SIGTERM)
    watcher = threading.Thread(
        target=_watch_parent, args=(parent_pid, poll_s), name="parent-watch", daemon=True
    )
    watcher.start()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bitplan.app.supervised_worker", description=__doc__, add_help=False
    )
    parser.add_argument("--parent", type=int, required=True, help="pid of the supervisor")
    args, rest = parser.parse_known_args(argv)
    die_with_parent(args.parent)
    from bitplan.app.worker import main as worker_main

    return worker_main(rest)


if __name__ == "__main__":
    sys.exit(main())
