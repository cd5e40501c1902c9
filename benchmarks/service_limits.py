"""Service limits: what hostile uploads cost a real ``bitplan serve`` (memory, time, disk).

Why: an API process that reads a body before checking the key, or loads an uploaded model in
its own memory, can be made to hold gigabytes by one request: an 85 KB zip whose config says
``num_hidden_layers: 100000`` once kept the API busy ~700 s at 10 GB RSS. The targets:

- (a) a 256 MiB body sent without an API key grows the API process's RSS by < 64 MB (it is
  refused with 401 before it is read);
- (b) that 100000-layer zip is refused with a 4xx in < 5 s and grows the API's RSS < 64 MB
  (the model is checked in a child process, bitplan.app.validation);
- (c) a refused zip leaves 0 bytes behind in the data folder.

For reference it also times the check of a valid tiny model (a fresh child process imports
torch and transformers for each check: that is most of the time).

What runs, all on 127.0.0.1: ``bitplan db upgrade``, ``bitplan keys create`` and ``bitplan
serve --workers 0`` with ``BITPLAN_AUTH=on`` on an embedded SQLite database in a temporary data
folder. The API's RSS is sampled from ``/proc/<pid>/status`` every 10 ms while each request
runs; growth is the highest sample minus the last one before the request. The data folder is
walked before and after each refused upload; the database files are left out of that count
(a request may append to SQLite's log). (a) sends its body with chunked encoding over a raw
socket, so the server cannot refuse it by a declared length, and reports how many bytes the
client managed to send before the answer came (the kernel's socket buffers hold some).

Run: ``python -m benchmarks.service_limits [--repeat 3] [--quick] [--json PATH] [--no-write]``;
it prints a table and writes the "Service limits" section of ``benchmarks/RESULTS.md``. Linux
only (``/proc``).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # as a script its folder leads sys.path and benchmarks/sensitivity.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # would shadow the package

import argparse
import io
import json
import logging
import os
import select
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx

from benchmarks._common import machine_info, publish_report

# The running-server helpers of the API load benchmark: one way to start and stop serve.
from benchmarks.api_load import HOST, Server, _free_port, _server

__all__ = ["main", "run_benchmark"]

logger = logging.getLogger("benchmarks.service_limits")

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
RSS_TARGET_MB = 64.0  # the bound on the API's growth for (a) and (b)
REFUSAL_TARGET_S = 5.0  # the bound on refusing the 100000-layer zip
UNKEYED_BODY_BYTES = 256 * MIB
_CHUNK = MIB  # the raw client sends 1 MiB chunks
_SAMPLE_S = 0.01  # RSS sampling period: far shorter than any request measured here
# A request slower than this is a failure: 20x the refusal target, room for a busy machine.
REQUEST_TIMEOUT_S = 120.0
_DB_FILES = (".db", ".db-wal", ".db-shm", ".db-journal")


def _rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` now (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@contextmanager
def _rss_growth(pid: int) -> Iterator[dict[str, float]]:
    """Sample ``pid``'s RSS while the block runs; yields a dict that gets ``growth_mb`` (the
    highest sample minus the one before the block) and ``before_mb`` once the block is done."""
    result: dict[str, float] = {}
    before = _rss_bytes(pid)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes(pid))
            done.wait(_SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        peak = max(peak, _rss_bytes(pid))
        result.update(before_mb=before / MIB, growth_mb=(peak - before) / MIB)


def _cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of ``pid`` itself and of its children it has reaped (the
    upload checks), from ``/proc/<pid>/stat``."""
    # The fields after "(comm)": state ppid ... utime (12th) stime (13th) cutime cstime.
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    own = (int(fields[11]) + int(fields[12])) / ticks
    children = (int(fields[13]) + int(fields[14])) / ticks
    return own, children


def _data_files(data_dir: Path) -> dict[str, int]:
    """Every file under ``data_dir`` but the databases, with its size."""
    return {
        str(p.relative_to(data_dir)): p.stat().st_size
        for p in data_dir.rglob("*")
        if p.is_file() and not p.name.endswith(_DB_FILES)
    }


def _bytes_left(before: dict[str, int], after: dict[str, int]) -> int:
    """Bytes in files that are new or grew between two walks."""
    return sum(max(size - before.get(name, 0), 0) for name, size in after.items())


def _tiny_bert(folder: Path) -> dict[str, bytes]:
    """The files of a 1-layer BERT with random weights (no download)."""
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=32,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _send_unkeyed(port: int, total: int) -> dict[str, Any]:
    """POST ``total`` bytes of chunked multipart to /v1/models without a key over a raw
    socket, sending while no answer has come; returns the status and the bytes sent."""
    chunk = b"0" * _CHUNK
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    head = (
        f"POST /v1/models HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        "Content-Type: multipart/form-data; boundary=b0undary\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    sent, answer = 0, b""
    start = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=REQUEST_TIMEOUT_S) as sock:
        sock.sendall(head)
        try:
            while sent < total:
                readable, writable, _ = select.select([sock], [sock], [], REQUEST_TIMEOUT_S)
                if readable:
                    break  # the answer came: stop sending, as a real client would
                if writable:
                    sock.sendall(framed)
                    sent += len(chunk)
            else:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed the connection after answering
        try:
            while b"\r\n" not in answer:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except (ConnectionResetError, TimeoutError):
            pass
    status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    status = int(status_line.split()[1]) if status_line.startswith("HTTP/") else None
    return {"status": status, "sent_mb": sent / MIB, "seconds": time.perf_counter() - start}


def _upload(server: Server, key: str, name: str, data: bytes) -> dict[str, Any]:
    start = time.perf_counter()
    response = httpx.post(
        f"{server.url}/v1/models",
        files={"file": (name, data)},
        headers={"Authorization": f"Bearer {key}"},
        timeout=REQUEST_TIMEOUT_S,
    )
    seconds = time.perf_counter() - start
    detail = response.json().get("detail", "") if response.status_code >= 400 else ""
    return {"status": response.status_code, "seconds": seconds, "detail": detail}


def _measured(
    server: Server, data_dir: Path, action: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """``action``'s result plus the API's RSS growth, the CPU it and its checks used, and the
    bytes it left in the data dir."""
    before = _data_files(data_dir)
    own, children = _cpu_s(server.pid)
    with _rss_growth(server.pid) as rss:
        result = action()
    own_after, children_after = _cpu_s(server.pid)
    return {
        **result,
        **rss,
        "api_cpu_s": own_after - own,
        "check_cpu_s": children_after - children,
        "bytes_left": _bytes_left(before, _data_files(data_dir)),
    }


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "bitplan.app.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=REQUEST_TIMEOUT_S,
    )
    return done.stdout.strip()


@dataclass(frozen=True)
class _Files:
    bert: dict[str, bytes]  # a valid model's files
    huge_zip: bytes  # its weights under a config that says 100000 layers

    def tiny_zip(self, round_: int) -> bytes:
        """The valid model, with a note that makes each round's bytes new (the same bytes
        uploaded again are deduplicated without a check)."""
        return _zip({**self.bert, "README.md": f"round {round_}\n".encode()})


def _files(workdir: Path) -> _Files:
    bert = _tiny_bert(workdir / "bert")
    config = json.loads(bert["config.json"])
    config["num_hidden_layers"] = 100_000
    huge = {**bert, "config.json": json.dumps(config).encode()}
    return _Files(bert=bert, huge_zip=_zip(huge))


def run_benchmark(*, repeat: int, workdir: Path, reference: bool = True) -> dict[str, Any]:
    """Start the service, run every case ``repeat`` times (the valid model's only with
    ``reference``); returns a JSON-ready dict."""
    files = _files(workdir)
    load_average = os.getloadavg()[0]  # what else this machine was running (it is shared)
    data_dir = workdir / "service"
    env = {
        **os.environ,
        "BITPLAN_DATA_DIR": str(data_dir),
        "BITPLAN_DATABASE_URL": f"sqlite:///{data_dir / 'bitplan.db'}",
        "BITPLAN_OPTUNA_STORAGE": f"sqlite:///{data_dir / 'optuna.db'}",
        "BITPLAN_CACHE_DIR": str(data_dir / "cache"),
        "BITPLAN_AUTH": "on",
    }
    data_dir.mkdir(parents=True)
    _cli(env, "db", "upgrade")
    key = _cli(env, "keys", "create", "benchmark")
    port = _free_port()
    command = [sys.executable, "-m", "bitplan.app.cli", "serve", "--host", HOST]
    command += ["--port", str(port), "--workers", "0"]
    cases: dict[str, list[dict[str, Any]]] = {"unkeyed": [], "huge": []}
    if reference:
        cases["tiny"] = []
    with _server(
        command, env=env, log=workdir / "service.log", health="/v1/health", port=port
    ) as server:
        for i in range(repeat):
            actions = {
                "unkeyed": partial(_send_unkeyed, port, UNKEYED_BODY_BYTES),
                "huge": partial(_upload, server, key, "huge.zip", files.huge_zip),
            }
            if reference:
                actions["tiny"] = partial(_upload, server, key, "tiny.zip", files.tiny_zip(i))
            for name, action in actions.items():
                cases[name].append(_measured(server, data_dir, action))
            logger.info("round %d: %s", i + 1, {k: v[-1] for k, v in cases.items()})
    return {
        "machine": machine_info(),
        "load_average": load_average,
        "repeat": repeat,
        "huge_zip_bytes": len(files.huge_zip),
        "cases": cases,
    }


def _summary(runs: list[dict[str, Any]], key: str) -> str:
    values = [run[key] for run in runs]
    return f"{statistics.median(values):.2f} (max {max(values):.2f})"


def _verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def to_markdown(report: dict[str, Any]) -> str:
    """The results section: one row per case, then the verdicts on the targets."""
    cases = report["cases"]
    unkeyed, huge = cases["unkeyed"], cases["huge"]
    rows = [
        "| case | answers | seconds, median (max) | check CPU s, median (max) | "
        "API RSS growth MB, median (max) | bytes left in data dir |",
        "|---|---|---:|---:|---:|---:|",
    ]
    labels = {
        "unkeyed": f"(a) {UNKEYED_BODY_BYTES // MIB} MiB body, no API key",
        "huge": f"(b, c) 100000-layer config zip ({report['huge_zip_bytes']} bytes)",
        "tiny": "valid 1-layer BERT zip (reference)",
    }
    for name, runs in cases.items():
        answers = ", ".join(sorted({str(run["status"]) for run in runs}))
        rows.append(
            f"| {labels[name]} | {answers} | {_summary(runs, 'seconds')} | "
            f"{_summary(runs, 'check_cpu_s')} | {_summary(runs, 'growth_mb')} | "
            f"{max(run['bytes_left'] for run in runs)} |"
        )
    sent = max(run["sent_mb"] for run in unkeyed)
    worst_growth = max(run["growth_mb"] for run in unkeyed + huge)
    refused = all(run["status"] is not None and 400 <= run["status"] < 500 for run in huge)
    slowest = max(run["seconds"] for run in huge)
    left = max(run["bytes_left"] for run in huge)
    detail = huge[0]["detail"]
    return "\n".join(
        [
            f"Machine: {report['machine']}",
            "",
            f"`python -m benchmarks.service_limits --repeat {report['repeat']}`: a real `bitplan "
            "serve --workers 0` with `BITPLAN_AUTH=on` (SQLite, temporary data folder); each "
            f"case {report['repeat']} times. RSS: the API process, sampled every "
            f"{_SAMPLE_S * 1000:.0f} ms from /proc while the request runs (growth = highest "
            "sample minus the one before). Bytes left: files that are new or grew in the data "
            "folder, database files excepted. Check CPU: CPU seconds of the child processes that "
            "checked the upload (/proc cutime + cstime of the API), which does not depend on what "
            "else the machine runs; the 1-minute load average at the start was "
            f"{report['load_average']:.1f} on {os.cpu_count()} cores.",
            "",
            *rows,
            "",
            f"- (a) the API's RSS grew at most {max(r['growth_mb'] for r in unkeyed):.1f} MB; "
            f"the client got {sent:.0f} MiB into socket buffers before the answer: "
            f"{_verdict(all(r['growth_mb'] < RSS_TARGET_MB for r in unkeyed))} "
            f"(< {RSS_TARGET_MB:.0f} MB)",
            f"- (b) refused with a 4xx in at most {slowest:.2f} s, RSS growth at most "
            f"{max(r['growth_mb'] for r in huge):.1f} MB: "
            f"{_verdict(refused and slowest < REFUSAL_TARGET_S)} (< {REFUSAL_TARGET_S:.0f} s), "
            f"{_verdict(max(r['growth_mb'] for r in huge) < RSS_TARGET_MB)} "
            f'(< {RSS_TARGET_MB:.0f} MB); its detail: "{detail}"',
            f"- (c) bytes left by the refused zips: {left}: {_verdict(left == 0)} (0)",
            f"- worst API RSS growth over (a) and (b): {worst_growth:.1f} MB",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: one round, no valid-model reference, RESULTS.md left alone",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    repeat = 1 if args.quick else args.repeat
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bitplan-service-limits-") as tmp:
        report = run_benchmark(repeat=repeat, workdir=Path(tmp), reference=not args.quick)
    publish_report(
        to_markdown(report),
        report,
        section="Service limits",
        json_path=args.json,
        record=not (args.quick or args.no_write),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
