"""The job runner of the chaos test (``test_chaos.py``): quick, deterministic, observable.

Every execution appends ``start`` and, if it gets there, ``finish`` lines to the file named by
:data:`LOG_ENV` (one ``os.write`` of a short line to an ``O_APPEND`` descriptor: lines of
concurrent processes never interleave), each with the job, the lease version of the attempt,
the process and a random token. It works for ``spec.trials`` steps of :data:`STEP_S` seconds,
checking for cancellation between steps (SIGTERM releases the job through it), so a kill lands
mid-job. Its token goes into ``out_dir`` first, so the published folder shows which execution it
came from, and is read back at the end: an execution whose staging folder was swept away under
it fails loudly (writing the frontier, which the report needs, would quietly recreate it).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from bitplan.search.plans import write_frontier
from bitplan.search.spec import JobSpec
from bitplan.sensitivity.progress import CancelFn, ProgressFn, check_cancel, report

LOG_ENV = "BITPLAN_CHAOS_LOG"
TOKEN_FILE = "execution.txt"
STEP_S = 0.1  # one step: short, so a job of a few steps ends soon after it is released


def note(event: str, *fields: object) -> None:
    """Append one line ``event field…`` to the chaos log, atomically."""
    line = " ".join([event, *map(str, fields)]) + "\n"
    descriptor = os.open(os.environ[LOG_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(descriptor, line.encode())
    finally:
        os.close(descriptor)


def run(
    spec: JobSpec,
    *,
    out_dir: Path,
    progress: ProgressFn,
    should_cancel: CancelFn,
    **_: Any,
) -> None:
    """One execution of a job: notes, steps, output, notes (see the module docstring)."""
    job_id, lease = out_dir.name.removesuffix(".partial").lstrip(".").rsplit(".", 1)
    token = uuid.uuid4().hex
    note("start", job_id, lease, os.getpid(), token)
    (out_dir / TOKEN_FILE).write_text(token)
    for step in range(1, spec.trials + 1):
        check_cancel(should_cancel)
        time.sleep(STEP_S)
        report(progress, "search", step, spec.trials)
    check_cancel(should_cancel)
    if not (out_dir / TOKEN_FILE).is_file():
        raise RuntimeError(f"the staging folder of attempt {lease} was removed while it ran")
    write_frontier(out_dir, model_ref=spec.model, model_sha256="0" * 64, budget=None, points=[])
    note("finish", job_id, lease, os.getpid(), token)
