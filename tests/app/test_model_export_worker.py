"""Model exports keep every durability property of the job queue, on SQLite and PostgreSQL: a
worker process killed (SIGKILL) mid-export leaves its staging folder, which the sweep knows and
removes once the lease is reaped; the export is claimed again and finishes once, its file equal
to the CLI's, nothing left in staging. And an export of an uploaded model names it by the
uploaded file's name (never a server path), while the upload cannot be deleted under it."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from bitplan.app import queue, worker
from bitplan.app.db import make_sessionmaker
from bitplan.app.export_run import run_export
from bitplan.app.model_exports import ExportSpec
from bitplan.app.models import Job
from bitplan.app.settings import Settings
from bitplan.app.states import JobKind, JobState
from bitplan.app.sweeper import sweep_settings
from bitplan.sensitivity.progress import CancelFn, ProgressFn, report
from tests.app._api_fixtures import api_client, assert_problem, job_body
from tests.app.test_model_export import (
    cli_apply,
    conforms,
    files_of,
    model_url,
    on_model_cache,
    plan_path,
    run_exports,
    succeeded_job,
    uniform_runner,
)
from tests.helpers import wait_until, write_tiny_hf_model, zip_folder

WAIT_S = 120.0  # how long a test waits for a condition: far beyond any plausible slowness
STEPS = 600  # steps of the slow export double, 0.1 s each: a minute, far longer than the test
UPLOAD_NAME = "my encoder.zip"
REAL_RUNNER = Settings.model_fields["export_runner"].default


def slow_export(
    spec: ExportSpec,
    *,
    out_dir: Path,
    progress: ProgressFn,
    should_cancel: CancelFn,
    **kwargs: Any,
) -> None:
    """The real export, after a minute of progress with a half-written file on disk: a worker
    killed meanwhile has its staging folder to leave behind."""
    out_dir.mkdir(parents=True)
    (out_dir / "model.safetensors").write_bytes(b"half a model")
    for step in range(STEPS):
        report(progress, "export", step, STEPS)
        time.sleep(0.1)
    run_export(spec, out_dir=out_dir, progress=progress, should_cancel=should_cancel, **kwargs)


@pytest.fixture
def export_settings(settings: Settings, bitplan_cache_dir: Path) -> Settings:
    return on_model_cache(settings, bitplan_cache_dir)


def _settings(settings: Settings, db_url: str) -> Settings:
    return settings.model_copy(
        update={
            "database_url": db_url,
            "lease_seconds": 1.5,
            "heartbeat_seconds": 0.3,
            "poll_seconds": 0.05,
            "export_runner": "test_model_export_worker:slow_export",
        }
    )


def _export(engine: Engine) -> Job:
    with make_sessionmaker(engine)() as session:
        (export,) = session.scalars(select(Job).where(Job.kind == JobKind.EXPORT.value))
        return export


def _staging(settings: Settings) -> list[Path]:
    return list(settings.artifact_dir.glob(".*.partial"))


def _exporting(engine: Engine, proc: subprocess.Popen[bytes]) -> Callable[[], bool]:
    def check() -> bool:
        assert proc.poll() is None, "worker process exited early"
        export = _export(engine)
        return export.state == JobState.RUNNING and export.progress > 0

    return check


def test_a_worker_killed_mid_export_is_reclaimed_and_leaves_nothing(
    export_settings: Settings,
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _settings(export_settings, db_url)
    with api_client(settings) as client:
        job_id, plan_id = succeeded_job(client, settings)
        url = model_url(job_id, plan_id, "bitplan")
        assert client.get(url).status_code == 202
        engine = client.app.state.engine

        here, root = Path(__file__).resolve().parent, Path(__file__).resolve().parents[2]
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(here), str(root)]))
        (proc,) = worker.spawn_workers(settings, count=1)
        try:
            wait_until(_exporting(engine, proc), "the export running", within_s=WAIT_S)
            running = conforms(client.get(url))
            assert running.status_code == 202 and running.json()["state"] == "running"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=WAIT_S)
        dead = _export(engine)
        (staging,) = _staging(settings)
        assert staging.name == f".{dead.id}.{dead.lease_version}.partial"
        assert (staging / "written" / "model.safetensors").read_bytes() == b"half a model"
        # While the lease runs the attempt may be alive: the sweep spares it ...
        assert staging not in sweep_settings(settings, client.app.state.sessionmaker).paths
        wait_until(lambda: queue.reap_expired(engine) == 1, "the lease reaped", within_s=WAIT_S)
        # ... and once the lease is reaped, the sweep knows the staging folder is dead.
        assert staging in sweep_settings(settings, client.app.state.sessionmaker).paths

        assert run_exports(settings.model_copy(update={"export_runner": REAL_RUNNER})) == 1
        export = _export(engine)
        assert (export.state, export.attempts, export.lease_version) == ("succeeded", 2, 2)
        served = client.get(url)
        assert served.status_code == 200, served.text

    archive = zipfile.ZipFile(io.BytesIO(served.content))
    cli = files_of(
        cli_apply(tmp_path, "builtin:digits-cnn", plan_path(settings, job_id, plan_id), "bitplan")
    )
    assert {name: archive.read(name) for name in archive.namelist()} == cli
    assert not _staging(settings)


def test_an_uploaded_models_export_names_it_by_its_file_name(
    export_settings: Settings, tmp_path: Path
) -> None:
    settings = export_settings
    with api_client(settings) as client:
        folder = write_tiny_hf_model(tmp_path / "encoder")
        archive = zip_folder(folder, tmp_path / "encoder.zip")
        upload = client.post("/v1/models", files={"file": (UPLOAD_NAME, archive.read_bytes())})
        assert upload.status_code == 201, upload.text
        model_id = upload.json()["id"]
        job_id = client.post("/v1/jobs", json=job_body(model=model_id, budget="6bpw")).json()["id"]
        assert worker.run_worker(settings, once=True, runner=uniform_runner) == 1
        plan_id = client.get(f"/v1/jobs/{job_id}").json()["plans"][0]
        url = model_url(job_id, plan_id, "bitplan")

        assert client.get(url).status_code == 202
        # The export reads the upload: it cannot be deleted while the export waits.
        assert_problem(client.delete(f"/v1/models/{model_id}"), 409)
        assert run_exports(settings) == 1
        served = client.get(url)
        assert served.status_code == 200, served.text

    files = zipfile.ZipFile(io.BytesIO(served.content))
    header = _safetensors_metadata(files.read("model.safetensors"))
    assert json.loads(header["__bitplan__"])["model_ref"] == UPLOAD_NAME
    server_folders = {str(settings.data_dir), str(settings.data_dir.resolve())}
    for name in files.namelist():
        text = files.read(name).decode(errors="replace")
        assert not any(folder in text for folder in server_folders), name


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file: an 8-byte little-endian header length,
    then the JSON header."""
    size = int.from_bytes(data[:8], "little")
    metadata: dict[str, str] = json.loads(data[8 : 8 + size])["__metadata__"]
    return metadata
