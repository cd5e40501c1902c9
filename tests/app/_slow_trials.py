"""The pipeline as a worker runner, with a pause in every search trial, for
tests/app/test_search_peers.py: trials of builtin:digits-cnn take a few milliseconds, too few
for a second worker to join before the search is over. Importing this module (the worker does,
at start-up, through ``BITPLAN_WORKER_RUNNER``) slows every trial in that process, the job's
own and those it runs for another worker's job."""

from __future__ import annotations

import os
import time
from typing import Any

from bitplan.search import pipeline
from bitplan.search.points import Choice

PAUSE_S = float(os.environ.get("BITPLAN_TEST_TRIAL_PAUSE_S", "0.3"))
_measure = pipeline._Evaluator.__call__


def _paused(self: Any, choice: Choice) -> float:
    time.sleep(PAUSE_S)
    return _measure(self, choice)


pipeline._Evaluator.__call__ = _paused  # type: ignore[method-assign]
run_job = pipeline.run_job
