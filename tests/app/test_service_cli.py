"""The service commands through typer's CliRunner: database and keys on a temp SQLite file, the
client commands against a live API (uvicorn on a free loopback port) with a worker thread whose
runner writes a job folder in the pipeline's format, and ``bitplan serve`` as a real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from sqlalchemy import create_engine, inspect
from typer.testing import CliRunner

from bitplan.app.cli import app
from bitplan.app.client import BitplanClient
from bitplan.app.embedded import embedded_service
from bitplan.app.service_cli import upload_ref
from bitplan.app.settings import Settings, get_settings
from bitplan.app.worker import run_worker
from bitplan.search.plans import read_frontier
from bitplan.search.spec import JobSpec
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.progress import ProgressFn, report
from tests.app._api_fixtures import api_client
from tests.app.test_report import write_job
from tests.helpers import SENTENCES

ROOT = Path(__file__).resolve().parents[2]
FAILING_BUDGET = "1bpw"  # the runner double fails jobs with this budget, as an infeasible one
runner = CliRunner()


def fake_runner(spec: JobSpec, *, out_dir: Path, progress: ProgressFn, **_: Any) -> None:
    """Stands in for run_job: a few progress steps, then a real-format job folder."""
    if spec.budget == FAILING_BUDGET:
        raise InputError(f"budget {spec.budget} is infeasible: the smallest reachable size is 9 kB")
    for step in range(1, 4):
        report(progress, "search", step, 3)
    write_job(out_dir, budget=spec.budget)


@pytest.fixture
def cli() -> typer.Typer:
    return app


@pytest.fixture
def live(settings: Settings) -> Iterator[str]:
    """The API on a free port and a worker thread running :func:`fake_runner`."""
    stop = threading.Event()
    worker = threading.Thread(
        target=run_worker,
        args=(settings,),
        daemon=True,
        kwargs={"stop_event": stop, "runner": fake_runner},
    )
    with embedded_service(settings.model_copy(update={"port": 0}), workers=0) as url:
        worker.start()
        yield url
        stop.set()
        worker.join(10)


@pytest.fixture
def env_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """BITPLAN_DATABASE_URL on an empty SQLite file, as an operator's shell would set it."""
    url = f"sqlite:///{tmp_path / 'service.db'}"
    monkeypatch.setenv("BITPLAN_DATABASE_URL", url)
    monkeypatch.setenv("BITPLAN_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()


def _one_line(text: str) -> str:
    assert text.strip() and "\n" not in text.strip() and "Traceback" not in text, text
    return text.strip()


def test_db_upgrade_then_keys_create_gives_a_working_key(
    cli: typer.Typer, env_db: str, tmp_path: Path
) -> None:
    early = runner.invoke(cli, ["keys", "create", "ci"])
    assert early.exit_code == 2 and "bitplan db upgrade" in _one_line(early.stderr)
    for _ in range(2):  # upgrading an up-to-date schema changes nothing
        assert runner.invoke(cli, ["db", "upgrade"]).exit_code == 0
    engine = create_engine(env_db)
    # Alembic keeps its version in its own table name (Optuna has an alembic_version of its own).
    assert {"jobs", "api_keys", "bitplan_alembic_version"} <= set(inspect(engine).get_table_names())
    engine.dispose()
    made = runner.invoke(cli, ["keys", "create", "ci"])
    assert made.exit_code == 0, made.output
    key = made.stdout.strip()
    assert key.startswith("bp_") and "not shown again" in made.stderr
    settings = Settings(database_url=env_db, data_dir=tmp_path / "data", auth="on")
    with api_client(settings) as client:
        assert client.get("/v1/jobs").status_code == 401
        assert (
            client.get("/v1/jobs", headers={"Authorization": "Bearer bp_nope"}).status_code == 401
        )
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_submit_wait_status_download_end_to_end(
    cli: typer.Typer, live: str, settings: Settings, tmp_path: Path
) -> None:
    submitted = runner.invoke(
        cli,
        [
            "submit",
            "builtin:digits-cnn",
            "--budget",
            "4kB",
            "--trials",
            "3",
            "--method",
            "weight",
            "--url",
            live,
        ],
    )
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip()
    waited = runner.invoke(cli, ["wait", job_id, "--timeout", "60", "--url", live])
    assert waited.exit_code == 0, waited.output
    assert f"job {job_id} succeeded" in waited.stderr
    shown = json.loads(runner.invoke(cli, ["status", job_id, "--json", "--url", live]).stdout)
    assert shown["state"] == "succeeded"
    assert (shown["request"]["budget"], shown["request"]["trials"]) == ("4kB", 3)
    line = runner.invoke(cli, ["status", job_id, "--url", live]).stdout
    assert f"{job_id}: succeeded" in line and "100%" in line
    late = runner.invoke(cli, ["cancel", job_id, "--url", live])
    assert late.exit_code == 2 and "409" in _one_line(late.stderr)

    out = tmp_path / "download"
    got = runner.invoke(cli, ["download", job_id, "-o", str(out), "--url", live])
    assert got.exit_code == 0, got.output
    served = settings.artifact_dir / job_id
    plans = sorted((served / "plans").glob("*.json"))
    assert plans and sorted((out / "plans").glob("*.json")) == [
        out / "plans" / p.name for p in plans
    ]
    for plan in plans:
        assert (out / "plans" / plan.name).read_bytes() == plan.read_bytes()
    assert read_frontier(out / "frontier.json") == read_frontier(served / "frontier.json")
    for name in ("frontier.csv", "sensitivity.csv"):
        assert (out / name).read_text() == (served / name).read_text()
    # The worker's report links to the API; the downloaded one to the files beside it.
    remote = httpx.get(f"{live}/v1/jobs/{job_id}/report").text
    assert f'href="/v1/jobs/{job_id}/plans/{plans[0].stem}?format=torchao"' in remote
    assert f'href="plans/{plans[0].name}"' in (out / "report.html").read_text()


def test_submit_uploads_a_model_folder_and_a_data_file_once(
    cli: typer.Typer, live: str, tiny_hf_model: Any, tmp_path: Path
) -> None:
    folder = tiny_hf_model("bert", task="feature-extraction")
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(SENTENCES))
    args = ["submit", str(folder), "--budget", "4kB", "--calib", str(data), "--url", live]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert f"uploading {folder}" in first.stderr and f"uploading {data}" in first.stderr
    # The folder's files get new timestamps: the zip is still the same bytes, so the server's
    # copies are reused and nothing is sent again.
    for item in folder.iterdir():
        os.utime(item, (item.stat().st_atime, item.stat().st_mtime + 60))
    second = runner.invoke(cli, args)
    assert second.exit_code == 0, second.output
    assert f"uploading {folder}" not in second.stderr
    assert f"uploading {data}" not in second.stderr
    assert second.stderr.count("the server has these bytes already") == 2
    with BitplanClient(live) as client:
        requests = [client.get_job(r.stdout.strip())["request"] for r in (first, second)]
        models = client.http.get("/v1/models").json()["data"]
        datasets = client.http.get("/v1/datasets").json()["data"]
    assert [m["filename"] for m in models] == [f"{folder.name}.zip"]
    assert [d["filename"] for d in datasets] == ["calib.txt"]
    for request in requests:
        assert (request["model"], request["calib"]) == (models[0]["id"], datasets[0]["id"])


def test_submit_sends_jobspec_defaults_and_every_request_option(
    cli: typer.Typer, live: str
) -> None:
    plain = runner.invoke(cli, ["submit", "builtin:digits-cnn", "--budget", "4kB", "--url", live])
    assert plain.exit_code == 0, plain.output
    full = runner.invoke(
        cli,
        [
            "submit", "builtin:digits-cnn", "--budget", "4kB", "--url", live,
            "--task", "text-classification", "--exclude", "conv*", "--exclude", "fc2",
            "--pin", "fc1=INT8", "--formats", "int8,int4-g64", "--sampler", "tpe",
            "--holdout", "0.5", "--max-length", "64", "--max-samples", "100", "--timeout", "9",
        ],
    )  # fmt: skip
    assert full.exit_code == 0, full.output
    with BitplanClient(live) as client:
        defaults = client.get_job(plain.stdout.strip())["request"]
        chosen = client.get_job(full.stdout.strip())["request"]
    expected = JobSpec(model="builtin:digits-cnn", budget="4kB").to_dict()
    assert {name: defaults[name] for name in defaults if name != "model"} == {
        name: expected[name] for name in defaults if name != "model"
    }
    assert chosen["task"] == "text-classification"
    assert chosen["exclude"] == ["conv*", "fc2"] and chosen["pins"] == {"fc1": "int8"}
    assert chosen["formats"] == ["int8", "int4-g64"] and chosen["sampler"] == "tpe"
    assert (chosen["holdout"], chosen["max_length"], chosen["max_samples"], chosen["timeout"]) == (
        0.5,
        64,
        100,
        9.0,
    )


@pytest.fixture
def idle(settings: Settings) -> Iterator[str]:
    """The API on a free port with no worker: submitted jobs stay queued."""
    with embedded_service(settings.model_copy(update={"port": 0}), workers=0) as url:
        yield url


def test_cancel_a_queued_job(cli: typer.Typer, idle: str) -> None:
    job_id = runner.invoke(cli, ["submit", "builtin:digits-cnn", "--budget", "4kB", "--url", idle])
    job_id = job_id.stdout.strip()
    cancelled = runner.invoke(cli, ["cancel", job_id, "--url", idle])
    assert cancelled.exit_code == 0, cancelled.output
    assert f"{job_id}: cancelled" in cancelled.stdout
    with BitplanClient(idle) as client:
        assert client.get_job(job_id)["state"] == "cancelled"
    again = runner.invoke(cli, ["cancel", job_id, "--url", idle])  # cancelling is idempotent
    assert again.exit_code == 0 and f"{job_id}: cancelled" in again.stdout
    missing = runner.invoke(cli, ["cancel", "no-such-job", "--url", idle])
    assert missing.exit_code == 2 and "404" in _one_line(missing.stderr)


def test_a_failed_download_leaves_no_folder(cli: typer.Typer, idle: str, tmp_path: Path) -> None:
    job_id = runner.invoke(cli, ["submit", "builtin:digits-cnn", "--budget", "4kB", "--url", idle])
    out = tmp_path / "results" / "job"
    got = runner.invoke(cli, ["download", job_id.stdout.strip(), "-o", str(out), "--url", idle])
    assert got.exit_code == 2 and "409" in _one_line(got.stderr)  # queued: nothing to download
    assert not (tmp_path / "results").exists()


def test_serve_help_shows_the_settings_defaults_and_variables(cli: typer.Typer) -> None:
    shown = runner.invoke(cli, ["serve", "--help"], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    for name in ("host", "port", "workers"):
        assert f"BITPLAN_{name.upper()}" in shown.stdout
        assert f"[default: {Settings.model_fields[name].default}]" in shown.stdout


def test_errors_are_one_line_with_exit_code_2(cli: typer.Typer, live: str) -> None:
    unknown = runner.invoke(cli, ["status", "no-such-job", "--url", live])
    assert unknown.exit_code == 2 and "404" in _one_line(unknown.stderr)
    bad = runner.invoke(cli, ["submit", "builtin:digits-cnn", "--budget", "lots", "--url", live])
    assert bad.exit_code == 2 and "422" in _one_line(bad.stderr)
    down = runner.invoke(cli, ["status", "x", "--url", "http://127.0.0.1:9"])
    assert down.exit_code == 2 and "cannot reach" in _one_line(down.stderr)


def test_a_failed_job_makes_wait_exit_1_with_the_reason(cli: typer.Typer, live: str) -> None:
    submitted = runner.invoke(
        cli, ["submit", "builtin:digits-cnn", "--budget", FAILING_BUDGET, "--wait", "--url", live]
    )
    assert submitted.exit_code == 1
    assert "failed" in submitted.stderr and "smallest reachable size" in submitted.stderr


@pytest.mark.parametrize(("stop", "code"), [(signal.SIGINT, 0), (signal.SIGTERM, 128 + 15)])
def test_serve_runs_the_api_and_workers_and_stops_them(
    tmp_path: Path, stop: signal.Signals, code: int
) -> None:
    env = {
        **os.environ,
        "BITPLAN_DATA_DIR": str(tmp_path / "data"),
        "BITPLAN_DATABASE_URL": f"sqlite:///{tmp_path / 'data' / 'bitplan.db'}",
        "BITPLAN_WORKER_RUNNER": "test_service_cli:fake_runner",
        "BITPLAN_POLL_SECONDS": "0.1",
        "BITPLAN_OPTUNA_STORAGE": "",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "app"), str(ROOT)]),
    }
    with socket.socket() as sock:  # a free port: bind to 0, read it, let go
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve = subprocess.Popen(
        [sys.executable, "-m", "bitplan.app.cli", "serve", "--port", str(port), "--workers", "1"],
        env=env,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _healthy(url):
            assert serve.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.2)
        workers = subprocess.run(
            ["pgrep", "-P", str(serve.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        assert len(workers) == 1
        with BitplanClient(url) as client:
            job = client.submit_job(model="builtin:digits-cnn", budget="4kB")
            assert client.wait_job(job["id"], poll_s=0.2, timeout=60)["state"] == "succeeded"
    finally:
        serve.send_signal(stop)
        assert serve.wait(30) == code
    for pid in workers:  # stopped and reaped by serve, not left running
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


class _FindOnly:
    """A client that has every upload already: records what it was asked to find."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []

    def find_upload(self, kind: str, *, sha256: str) -> dict[str, Any]:
        self.asked.append((kind, sha256))
        return {"id": "known-upload"}


def test_a_local_file_named_like_builtin_is_uploaded_not_passed_as_a_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("builtin_corpus.txt").write_text("hello\n")
    client = _FindOnly()
    got = upload_ref(client, "builtin_corpus.txt", kind="dataset")  # type: ignore[arg-type]
    assert got == "known-upload" and [kind for kind, _ in client.asked] == ["dataset"]
    assert upload_ref(client, "builtin", kind="dataset") == "builtin"  # type: ignore[arg-type]
    assert upload_ref(client, "builtin:tiny-lm", kind="model") == "builtin:tiny-lm"  # type: ignore[arg-type]
    assert len(client.asked) == 1
