"""A stand-in for ``python -m bitplan.app.upload_check`` that answers at once, as the
``BITPLAN_TEST_CHECK`` environment variable says, so the API's handling of every way a check
can end is tested without importing torch in a child each time.

Modes: ``valid``, ``invalid`` (a detail quoting the server paths it was given), ``oom``,
``failed``, ``garbage`` (no JSON), ``killed`` (SIGKILL, as the kernel's OOM killer would) and
``sleep`` (never answers). It writes a file into its scratch folder first (the parent must
remove it) and its pid to ``BITPLAN_TEST_CHECK_PIDFILE`` when set.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

_SLEEP_S = 600  # far past any test's timeout: only a kill ends it


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scratch", type=Path, required=True)
    parser.add_argument("path")
    args, _ = parser.parse_known_args()
    pidfile = os.environ.get("BITPLAN_TEST_CHECK_PIDFILE")
    if pidfile:
        Path(pidfile).write_text(str(os.getpid()))
    (args.scratch / "extracted.bin").write_bytes(b"\0" * 4096)
    mode = os.environ["BITPLAN_TEST_CHECK"]
    if mode == "sleep":
        time.sleep(_SLEEP_S)
    if mode == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    answers: dict[str, object] = {
        "valid": {"outcome": "valid", "summary": "fake"},
        "invalid": {"outcome": "invalid", "detail": f"{args.path}: bad, see {args.scratch}/x"},
        "oom": {"outcome": "out-of-memory"},
        "failed": {"outcome": "failed", "error": "RuntimeError"},
        "garbage": "not an answer",
    }
    answer = answers[mode]
    print(json.dumps(answer) if isinstance(answer, dict) else answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
