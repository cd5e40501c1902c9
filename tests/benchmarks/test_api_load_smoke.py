"""The API load benchmark: a ``--quick`` run end to end, error counting, and the verdict.

The quick run starts the real service (``bitplan serve`` with a worker running a job) and the
bare baseline as subprocesses on loopback, polls both for a couple of seconds per phase and must
leave ``benchmarks/RESULTS.md`` alone.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS_PATH
from benchmarks.api_load import MODES, POLL_INTERVAL_S, run_load, to_markdown

ROOT = Path(__file__).resolve().parents[2]
# Two server start-ups (each imports torch) and four 2-second phases, on a busy 2-core machine.
QUICK_TIMEOUT_S = 180


def _results_text() -> str | None:
    return RESULTS_PATH.read_text(encoding="utf-8") if RESULTS_PATH.exists() else None


def test_quick_run_polls_a_running_job_and_the_baseline_without_errors(tmp_path: Path) -> None:
    before = _results_text()
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/api_load.py", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    phases = {(p["target"], p["mode"]): p for p in report["phases"]}
    assert set(phases) == {(t, m) for t in ("bitplan", "bare") for m in MODES}
    for phase in phases.values():
        assert phase["requests"] > 0 and phase["errors"] == 0, phase
        assert phase["p50_ms"] <= phase["p99_ms"] <= phase["max_ms"]
        assert phase["server_cpu_ms"] > 0 and phase["client_cpu_ms"] > 0
    # The worker burns CPU on the job while the pollers run.
    assert max(p["worker_cores"] for p in phases.values()) > 0
    # Pollers revalidate with If-None-Match, so the job answers 200 or 304 and nothing else.
    # How many are 304 depends on how often the running job's progress and ETA change, so it
    # is not asserted here; tests/app/test_api_jobs.py checks ETag/304 deterministically.
    for mode in MODES:
        assert set(phases[("bitplan", mode)]["statuses"]) <= {"200", "304"}
    # What the pollers guarantee, however fast this machine is: every client starts polling at
    # once (paced ones within one interval, shorter than the phase), and a paced client never
    # polls faster than its interval. How many more requests the saturated clients fit in
    # depends on the machine's speed, so that ratio is a result, not an assertion.
    clients, seconds = report["clients"], report["seconds"]
    assert POLL_INTERVAL_S < seconds
    most_paced = clients * (seconds / POLL_INTERVAL_S + 1)
    for target in ("bitplan", "bare"):
        assert clients <= phases[(target, "paced")]["requests"] <= most_paced
        assert phases[(target, "saturated")]["requests"] >= clients
    # The job ran during every phase (the load is measured "while a job runs").
    assert report["job_seen"] and all(s.startswith("running/") for s in report["job_seen"])
    assert "| bitplan | saturated |" in done.stdout
    assert _results_text() == before  # --quick never records results


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_refused_connections_are_errors() -> None:
    url = f"http://127.0.0.1:{_unused_port()}/status"
    result = asyncio.run(
        run_load(url, target="nobody", mode="saturated", clients=3, seconds=0.3, conditional=False)
    )
    assert result.requests > 0
    assert result.errors == result.requests
    assert set(result.statuses) == {"ConnectError"}
    assert 0 < len(result.error_samples) <= 5
    assert result.seconds >= 0.3  # the real length of the phase


def _phase(target: str, mode: str, *, p99_ms: float, errors: int = 0) -> dict[str, Any]:
    return {
        "target": target,
        "mode": mode,
        "requests": 100,
        "rps": 50.0,
        "p50_ms": 1.0,
        "p95_ms": 2.0,
        "p99_ms": p99_ms,
        "max_ms": p99_ms,
        "errors": errors,
        "statuses": {"200": 100 - errors},
        "server_cpu_ms": p99_ms / 10,
        "client_cpu_ms": 1.0,
        "worker_cores": 1.0,
    }


def test_markdown_gives_the_verdict_and_ratios_per_mode() -> None:
    report = {
        "machine": "test machine",
        "clients": 100,
        "seconds": 30.0,
        "job": "builtin:x",
        "job_seen": ["running/search 10%"],
        "phases": [
            _phase("bitplan", "saturated", p99_ms=80.0),
            _phase("bare", "saturated", p99_ms=20.0),
            _phase("bitplan", "paced", p99_ms=10.0),
            _phase("bare", "paced", p99_ms=5.0),
        ],
    }
    text = to_markdown(report)
    assert "test machine" in text
    assert (
        "- saturated: bitplan/bare requests/s 1.00, p99 4.00x, server CPU per request "
        "4.00x; bitplan misses"
    ) in text
    assert (
        "- paced: bitplan/bare requests/s 1.00, p99 2.00x, server CPU per request 2.00x; "
        "bitplan meets"
    ) in text
    # 1 ms of CPU per paced poll: 1000 polls/s on one core against 100 / 0.5 s offered.
    assert "one whole core serves ~1000 polls/s; 100 pollers every 0.5 s offer 200/s" in text
    report["phases"][2]["errors"] = 1  # any error misses the target, however fast
    assert "bitplan misses the target" in to_markdown(report).split("- paced:")[1]
