"""API load: many clients polling a running job's status over loopback, against a bare baseline.

Why: people and CI systems wait for a job by polling ``GET /v1/jobs/{id}``; a crowd of them
must not make the service slow or make it fail while a worker writes the job's progress to the
same SQLite file. The issue's target: 100 concurrent pollers, 0 errors and p99 < 50 ms.

What runs, all on 127.0.0.1 and bounded in time:

- the real service, ``bitplan serve`` (migrations, uvicorn, one worker process) in a
  subprocess on a free port, with an embedded SQLite database in a temporary data folder and
  API keys off (the default on loopback); a real job (``builtin:digits-cnn``, a measured search
  with more trials than it can finish, stopped by its own timeout or cancelled at the end) keeps
  the worker busy and writing progress for the whole run;
- a bare FastAPI app (one endpoint answering a small JSON, no database) served by uvicorn with
  the same defaults in another subprocess: the framework's own floor on this machine;
- one asyncio event loop of ``--clients`` httpx clients (``asyncio.gather``, one keep-alive
  connection each), in two modes per target, interleaved so both targets see the same job:
  ``saturated`` (no pause between requests: the most requests/s, where latency is mostly queue,
  Little's law latency ~ clients / throughput) and ``paced`` (each client polls every
  :data:`POLL_INTERVAL_S`, like ``bitplan wait``: the latency a poller sees). Pollers of the
  job send ``If-None-Match`` like :class:`bitplan.app.client.BitplanClient`, so most answers are
  304s.

An error is any answer other than 200/304, or an exception (timeouts included). Latency is
measured by the client, so it includes the client's own event-loop delays: the load generator,
both servers and the worker share this machine's cores (say so when you quote the numbers).
Run: ``python benchmarks/api_load.py [--seconds 30] [--clients 100] [--quick] [--json PATH]``;
it prints a table and writes the "API load" section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # as a script its folder leads sys.path and benchmarks/sensitivity.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # would shadow the package

import argparse
import asyncio
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI

from benchmarks._common import machine_info, publish_report
from bitplan.search.spec import MAX_TRIALS

__all__ = ["LoadResult", "bare_app", "main", "run_benchmark", "run_load"]

logger = logging.getLogger("benchmarks.api_load")

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
TARGET_P99_MS = 50.0  # the target for 100 pollers
POLL_INTERVAL_S = 0.5  # `bitplan wait` polls every half second (app.service_cli)
# A request slower than this is an error: far beyond any poller's patience, short enough that a
# stuck server cannot stretch a 30 s phase much.
REQUEST_TIMEOUT_S = 10.0
# Starting a server imports torch and transformers and applies migrations: slow on a busy
# 2-core machine, never a minute.
STARTUP_TIMEOUT_S = 90.0
STOP_GRACE_S = 15.0  # `bitplan serve` gives its worker 10 s to release the job when stopped
# The job: more trials than it can run in the benchmark, so the worker stays busy throughout.
JOB_REQUEST = {
    "model": "builtin:digits-cnn",
    "budget": "4bpw",
    "method": "layer",
    "trials": MAX_TRIALS,
}
MODES = ("saturated", "paced")


@dataclass
class LoadResult:
    """One load phase: ``clients`` pollers of ``target`` for ``seconds``."""

    target: str
    mode: str
    clients: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> dict[str, Any]:
        """Everything but the raw latencies, for ``--json`` and the results table."""
        data = {k: v for k, v in asdict(self).items() if k != "latencies_ms"}
        data["statuses"] = dict(self.statuses)
        data.update(
            requests=self.requests,
            rps=self.rps,
            p50_ms=self.percentile_ms(50),
            p95_ms=self.percentile_ms(95),
            p99_ms=self.percentile_ms(99),
            max_ms=max(self.latencies_ms, default=float("nan")),
        )
        return data


def bare_app() -> FastAPI:
    """The baseline: one endpoint, a small constant JSON, no database, no dependencies; a
    plain ``def`` like bitplan's own routes, so both pay FastAPI's thread-pool hop."""
    app = FastAPI()

    @app.get("/status")
    def status() -> dict[str, Any]:
        return {"state": "running", "stage": "search", "progress": 0.5}

    return app


# --- load ------------------------------------------------------------------------------------


async def _poller(
    http: httpx.AsyncClient,
    url: str,
    result: LoadResult,
    *,
    deadline: float,
    interval: float,
    offset: float,
    conditional: bool,
) -> None:
    """One client: GET ``url`` until ``deadline``, every ``interval`` s (0: back to back)."""
    etag: str | None = None
    next_at = time.perf_counter() + offset
    while True:
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        start = time.perf_counter()
        if start >= deadline:
            return
        headers = {"If-None-Match": etag} if etag else {}
        try:
            response = await http.get(url, headers=headers)
        except httpx.HTTPError as exc:
            label, detail = type(exc).__name__, f"{type(exc).__name__}: {exc}"
        else:
            label = detail = str(response.status_code)
            if conditional and response.status_code == 200:
                etag = response.headers.get("ETag")
        result.latencies_ms.append((time.perf_counter() - start) * 1000.0)
        result.statuses[label] += 1
        if label not in ("200", "304"):
            result.errors += 1
            if len(result.error_samples) < 5:
                result.error_samples.append(detail)
        # A late client polls at once but never bursts to catch up on missed ticks.
        next_at = max(next_at + interval, time.perf_counter())


async def run_load(
    url: str, *, target: str, mode: str, clients: int, seconds: float, conditional: bool
) -> LoadResult:
    """``clients`` concurrent pollers of ``url`` for ``seconds`` on this event loop. The
    result's ``seconds`` is the phase's real length, until the last answer came back."""
    if mode not in MODES:
        raise ValueError(f"unknown load mode {mode!r}; accepted: {', '.join(MODES)}")
    interval = POLL_INTERVAL_S if mode == "paced" else 0.0
    result = LoadResult(target=target, mode=mode, clients=clients, seconds=seconds)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as http:
        start = time.perf_counter()
        # Paced clients start spread over one interval, as independent pollers would be.
        await asyncio.gather(
            *(
                _poller(
                    http,
                    url,
                    result,
                    deadline=start + seconds,
                    interval=interval,
                    offset=interval * i / clients,
                    conditional=conditional,
                )
                for i in range(clients)
            )
        )
        result.seconds = time.perf_counter() - start
    return result


# --- servers ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _wait_listening(base_url: str, path: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with {process.returncode}; see {log}:\n"
                + log.read_text(errors="replace")[-2000:]
            )
        try:
            if httpx.get(base_url + path, timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server at {base_url} not up after {STARTUP_TIMEOUT_S:.0f} s; see {log}")


@dataclass(frozen=True)
class Server:
    """A running server: its base URL and its pid (also its process group's id)."""

    url: str
    pid: int


@contextmanager
def _server(
    command: list[str], *, env: dict[str, str], log: Path, health: str, port: int
) -> Iterator[Server]:
    """Run ``command`` (a server on ``port``) in its own process group and yield it once
    ``health`` answers 200.

    It is stopped with SIGINT, as a person stops ``bitplan serve`` with Ctrl-C: uvicorn
    re-raises a SIGTERM after its shutdown, which kills ``serve`` before it stops its workers.
    Whatever of the group outlives the grace period (a worker included) is killed.
    """
    base_url = f"http://{HOST}:{port}"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_listening(base_url, health, process, log)
        yield Server(base_url, process.pid)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            logger.warning("server %d ignored SIGINT; killing it", process.pid)
        _kill_group(process.pid)
        process.wait()


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of the process group ``pgid`` (our server and its children)."""
    try:
        os.killpg(pgid, 0)  # raises when nothing of the group is left
    except ProcessLookupError:
        return
    logger.warning("processes of server group %d outlived it; killing them", pgid)
    os.killpg(pgid, signal.SIGKILL)


def _cpu_by_pid(pgid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every live process in group ``pgid``, from ``/proc``
    (Linux); empty where there is no ``/proc``."""
    ticks = os.sysconf("SC_CLK_TCK")
    usage: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The fields after "(comm)": state ppid pgrp ... utime (12th) stime (13th).
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[2]) == pgid:
            usage[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return usage


@dataclass
class CpuSnapshot:
    """CPU seconds so far of the servers (by pid), their other processes (the job's worker)
    and this load generator."""

    servers: dict[int, float]
    others: float
    client: float

    @classmethod
    def take(cls, servers: list[Server]) -> CpuSnapshot:
        own, others = {}, 0.0
        for server in servers:
            usage = _cpu_by_pid(server.pid)
            own[server.pid] = usage.pop(server.pid, float("nan"))
            others += sum(usage.values())
        return cls(servers=own, others=others, client=time.process_time())


def _cpu_columns(
    before: CpuSnapshot, after: CpuSnapshot, server: Server, result: LoadResult
) -> dict[str, float]:
    """Per-phase CPU: milliseconds per request of the polled server and of the load
    generator, and the cores the job's worker used meanwhile."""
    per_request = 1000.0 / max(result.requests, 1)
    return {
        "server_cpu_ms": (after.servers[server.pid] - before.servers[server.pid]) * per_request,
        "client_cpu_ms": (after.client - before.client) * per_request,
        "worker_cores": (after.others - before.others) / result.seconds,
    }


def _service_env(data_dir: Path) -> dict[str, str]:
    """``BITPLAN_*`` for an embedded service in ``data_dir``; builtin models come from the
    usual cache (so the worker does not retrain them)."""
    from bitplan.sensitivity.models import resolve_cache_dir

    return {
        **os.environ,
        "BITPLAN_DATA_DIR": str(data_dir),
        "BITPLAN_DATABASE_URL": f"sqlite:///{data_dir / 'bitplan.db'}",
        "BITPLAN_OPTUNA_STORAGE": f"sqlite:///{data_dir / 'optuna.db'}",
        "BITPLAN_CACHE_DIR": str(resolve_cache_dir()),
        "BITPLAN_AUTH": "off",
    }


def _start_job(base_url: str, *, timeout_s: float) -> str:
    """Submit the job and wait until the worker runs it; returns its URL path."""
    body = {**JOB_REQUEST, "timeout": timeout_s}
    response = httpx.post(f"{base_url}/v1/jobs", json=body, timeout=REQUEST_TIMEOUT_S)
    response.raise_for_status()
    path = response.headers["Location"]
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        job = httpx.get(base_url + path, timeout=REQUEST_TIMEOUT_S).json()
        if job["state"] == "running":
            return path
        if job["state"] != "queued":
            raise RuntimeError(f"the benchmark job ended before the load: {job}")
        time.sleep(0.2)
    raise RuntimeError(f"no worker picked up the benchmark job in {STARTUP_TIMEOUT_S:.0f} s")


def _job_view(base_url: str, path: str) -> str:
    job = httpx.get(base_url + path, timeout=REQUEST_TIMEOUT_S).json()
    return f"{job['state']}/{job['stage']} {job['progress']:.0%}"


# --- the benchmark ---------------------------------------------------------------------------


def run_benchmark(
    *, clients: int, seconds: float, modes: tuple[str, ...] = MODES, workdir: Path
) -> dict[str, Any]:
    """Both servers, the job, and every (mode, target) phase; returns a JSON-ready dict."""
    python = sys.executable
    uvicorn_bare = [
        python,
        "-m",
        "uvicorn",
        "--factory",
        "benchmarks.api_load:bare_app",
        "--host",
        HOST,
    ]
    phases: list[dict[str, Any]] = []
    job_seen: list[str] = []
    with ExitStack() as stack:
        port = _free_port()
        service = stack.enter_context(
            _server(
                [
                    python,
                    "-m",
                    "bitplan.app.cli",
                    "serve",
                    "--host",
                    HOST,
                    "--port",
                    str(port),
                    "--workers",
                    "1",
                ],
                env=_service_env(workdir / "service"),
                log=workdir / "service.log",
                health="/v1/health",
                port=port,
            )
        )
        # The job outlives every phase (plus startup slack), then stops by itself.
        job_path = _start_job(service.url, timeout_s=len(modes) * 2 * seconds + 120.0)
        bare_port = _free_port()
        bare = stack.enter_context(
            _server(
                [*uvicorn_bare, "--port", str(bare_port)],
                env=dict(os.environ),
                log=workdir / "bare.log",
                health="/status",
                port=bare_port,
            )
        )
        for mode in modes:
            for target, server, path, conditional in (
                ("bitplan", service, job_path, True),
                ("bare", bare, "/status", False),
            ):
                logger.info("%s, %s: %d clients for %.0f s", target, mode, clients, seconds)
                before = CpuSnapshot.take([service, bare])
                result = asyncio.run(
                    run_load(
                        server.url + path,
                        target=target,
                        mode=mode,
                        clients=clients,
                        seconds=seconds,
                        conditional=conditional,
                    )
                )
                after = CpuSnapshot.take([service, bare])
                phases.append({**result.summary(), **_cpu_columns(before, after, server, result)})
                job_seen.append(_job_view(service.url, job_path))
        httpx.post(f"{service.url}{job_path}:cancel", timeout=REQUEST_TIMEOUT_S)
    return {
        "machine": machine_info(),
        "clients": clients,
        "seconds": seconds,
        "job": JOB_REQUEST["model"],
        "job_seen": job_seen,
        "phases": phases,
    }


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}" if denominator > 0 else "n/a"


def to_markdown(report: dict[str, Any]) -> str:
    """The "API load" section: machine, setup, one row per phase, the ratios and the verdict."""
    rows = [
        "| target | mode | requests | req/s | p50 ms | p95 ms | p99 ms | max ms | errors | "
        "server CPU ms/req | client CPU ms/req | worker cores | answers |",
        "|---|---|" + "---:|" * 10 + "---|",
    ]
    by_key = {(p["target"], p["mode"]): p for p in report["phases"]}
    for p in report["phases"]:
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(p["statuses"].items()))
        rows.append(
            f"| {p['target']} | {p['mode']} | {p['requests']} | {p['rps']:.0f} | "
            f"{p['p50_ms']:.1f} | {p['p95_ms']:.1f} | {p['p99_ms']:.1f} | "
            f"{p['max_ms']:.1f} | {p['errors']} | {p['server_cpu_ms']:.2f} | "
            f"{p['client_cpu_ms']:.2f} | {p['worker_cores']:.2f} | {answers} |"
        )
    lines = []
    for mode in dict.fromkeys(p["mode"] for p in report["phases"]):
        ours, bare = by_key[("bitplan", mode)], by_key[("bare", mode)]
        verdict = "meets" if ours["errors"] == 0 and ours["p99_ms"] < TARGET_P99_MS else "misses"
        lines.append(
            f"- {mode}: bitplan/bare requests/s {_ratio(ours['rps'], bare['rps'])}, "
            f"p99 {_ratio(ours['p99_ms'], bare['p99_ms'])}x, server CPU per request "
            f"{_ratio(ours['server_cpu_ms'], bare['server_cpu_ms'])}x; bitplan "
            f"{verdict} the target (0 errors, p99 < {TARGET_P99_MS:.0f} ms)"
        )
    paced = by_key.get(("bitplan", "paced"), by_key[("bitplan", report["phases"][0]["mode"])])
    offered = report["clients"] / POLL_INTERVAL_S
    lines.append(
        f"- capacity: at {paced['server_cpu_ms']:.2f} ms of CPU per poll, one whole "
        f"core serves ~{1000.0 / paced['server_cpu_ms']:.0f} polls/s; "
        f"{report['clients']} pollers every {POLL_INTERVAL_S} s offer {offered:.0f}/s"
    )
    return "\n".join(
        [
            f"Machine: {report['machine']}",
            "",
            f"`python benchmarks/api_load.py --clients {report['clients']} --seconds "
            f"{report['seconds']:g}`: {report['clients']} concurrent httpx clients on one event "
            f"loop poll `GET /v1/jobs/{{id}}` of `bitplan serve` (SQLite, one worker running a "
            f"{report['job']} job, keys off) with `If-None-Match`, and a bare FastAPI endpoint "
            "served by uvicorn the same way, for "
            f"{report['seconds']:g} s per phase. *saturated*: no pause between requests (latency "
            f"is mostly queueing: ~clients / throughput); *paced*: every client polls every "
            f"{POLL_INTERVAL_S} s like `bitplan wait`. The load generator, both servers and the "
            "worker share this machine's cores, so the client-measured latency includes the load "
            "generator's own scheduling delays; CPU per request (from /proc) does not depend on "
            "that sharing. *worker cores*: CPU the job's worker used meanwhile.",
            "",
            *rows,
            "",
            *lines,
            f"- job state after each phase: {', '.join(report['job_seen'])}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100, help="concurrent pollers")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 10 clients, 2 s phases, RESULTS.md left alone",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0:
        parser.error("--clients must be >= 1 and --seconds > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    clients, seconds = (10, 2.0) if args.quick else (args.clients, args.seconds)
    with tempfile.TemporaryDirectory(prefix="bitplan-api-load-") as tmp:
        report = run_benchmark(clients=clients, seconds=seconds, workdir=Path(tmp))
    publish_report(
        to_markdown(report),
        report,
        section="API load",
        json_path=args.json,
        record=not (args.quick or args.no_write),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
