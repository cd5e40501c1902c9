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
from _api_fixtures import api_client
from sqlalchemy import create_engine, inspect
from test_report import write_job
from typer.testing import CliRunner

from bitplan.app.client import BitplanClient
from bitplan.app.service_cli import embedded_service, register
from bitplan.app.settings import Settings, get_settings
from bitplan.app.worker import run_worker
from bitplan.search.plans import read_frontier
from bitplan.search.spec import JobSpec
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.progress import ProgressFn, report
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
    app = typer.Typer()

    @app.callback()
    def _main() -> None:  # a callback keeps typer in multi-command mode, like bitplan's app
        pass

    register(app)
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


def test_submit_uploads_a_model_folder_and_a_data_file(
    cli: typer.Typer, live: str, tiny_hf_model: Any, tmp_path: Path
) -> None:
    folder = tiny_hf_model("bert", task="feature-extraction")
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(SENTENCES))
    submitted = runner.invoke(
        cli, ["submit", str(folder), "--budget", "4kB", "--calib", str(data), "--url", live]
    )
    assert submitted.exit_code == 0, submitted.output
    with BitplanClient(live) as client:
        request = client.get_job(submitted.stdout.strip())["request"]
        models = client.http.get("/v1/models").json()["data"]
        datasets = client.http.get("/v1/datasets").json()["data"]
    assert [m["filename"] for m in models] == [f"{folder.name}.zip"]
    assert [d["filename"] for d in datasets] == ["calib.txt"]
    assert (request["model"], request["calib"]) == (models[0]["id"], datasets[0]["id"])


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


_SERVE = (
    "import typer; from bitplan.app.service_cli import register; app = typer.Typer(); "
    "app.callback()(lambda: None); register(app); app()"
)


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
        [sys.executable, "-c", _SERVE, "serve", "--port", str(port), "--workers", "1"],
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
