"""The pipeline as a worker runner, with a pause in every search trial, for
tests/app/test_search_peers.py: trials of builtin:digits-cnn take a few milliseconds, too few
for a second worker to join before the search is over. Importing this module (the worker does,
at start-up, through ``BITPLAN_WORKER_RUNNER``) slows every trial in that process, the job's
own and those it runs for another worker's job.

With ``BITPLAN_TEST_GATE_DIR`` set, trials also wait for a second process: each process marks
its first trial with a file there, and no process starts a trial while fewer than two have
(at most ``GATE_WAIT_S``), so the job's worker cannot finish the search before the idle one,
slow to start on a loaded machine, has joined it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from bitplan.search import pipeline
from bitplan.search.points import Choice

PAUSE_S = float(os.environ.get("BITPLAN_TEST_TRIAL_PAUSE_S", "0.3"))
GATE_WAIT_S = 40.0
_measure = pipeline._Evaluator.__call__


_gate_open = [False]


def _wait_for_two_processes() -> None:
    """Mark this process's trial, then wait for a second process's mark: once per process, at
    most ``GATE_WAIT_S`` in all (a peer killed before its mark costs one wait, not one a trial)."""
    gate = os.environ.get("BITPLAN_TEST_GATE_DIR")
    if not gate or _gate_open[0]:
        return
    _gate_open[0] = True
    folder = Path(gate)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(os.getpid())).touch()
    deadline = time.monotonic() + GATE_WAIT_S
    while len(list(folder.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)


def _paused(self: Any, choice: Choice) -> float:
    _wait_for_two_processes()
    time.sleep(PAUSE_S)
    return _measure(self, choice)


pipeline._Evaluator.__call__ = _paused  # type: ignore[method-assign]
run_job = pipeline.run_job
