"""A stand-in for ``python -m bitplan.app.upload_check`` that answers at once, as the
``BITPLAN_TEST_CHECK`` environment variable says, so the API's handling of every way a check
can end is tested without importing torch in a child each time.

Modes: ``valid``, ``invalid`` (a detail quoting the server paths it was given), ``oom``,
``failed``, ``garbage`` (no JSON), ``killed`` (SIGKILL, as the kernel's OOM killer would),
``sleep`` (never answers) and ``grandchild`` (starts ``sleep 60``, which keeps its stdout and
stderr open, then answers valid and exits). It writes a file into its scratch folder first
(the parent must remove it); it writes its pid to ``BITPLAN_TEST_CHECK_PIDFILE`` (whole, by a
rename) and appends it to ``BITPLAN_TEST_CHECK_RUNS`` when they are set, and the grandchild's
pid to ``BITPLAN_TEST_GRANDCHILD_PIDFILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

_SLEEP_S = 600  # far past any test's timeout: only a kill ends it


def _write_pid(path: str, pid: int) -> None:
    """``pid`` into ``path`` by a rename, so a reader never sees an empty file."""
    partial = Path(f"{path}.partial")
    partial.write_text(str(pid))
    os.replace(partial, path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scratch", type=Path, required=True)
    parser.add_argument("path")
    args, _ = parser.parse_known_args()
    runs = os.environ.get("BITPLAN_TEST_CHECK_RUNS")
    if runs:
        with open(runs, "a", encoding="utf-8") as log:
            log.write(f"{os.getpid()}\n")
    pidfile = os.environ.get("BITPLAN_TEST_CHECK_PIDFILE")
    if pidfile:
        _write_pid(pidfile, os.getpid())
    (args.scratch / "extracted.bin").write_bytes(b"\0" * 4096)
    mode = os.environ["BITPLAN_TEST_CHECK"]
    if mode == "sleep":
        time.sleep(_SLEEP_S)
    if mode == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "grandchild":
        grandchild = subprocess.Popen(["sleep", "60"])  # inherits stdout and stderr
        _write_pid(os.environ["BITPLAN_TEST_GRANDCHILD_PIDFILE"], grandchild.pid)
    answers: dict[str, object] = {
        "valid": {"outcome": "valid", "summary": "fake"},
        "grandchild": {"outcome": "valid", "summary": "fake"},
        "invalid": {"outcome": "invalid", "detail": f"{args.path}: bad, see {args.scratch}/x"},
        "oom": {"outcome": "out-of-memory"},
        "failed": {"outcome": "failed", "error": "RuntimeError"},
        "garbage": "not an answer",
    }
    answer = answers[mode]
    print(json.dumps(answer) if isinstance(answer, dict) else answer, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
