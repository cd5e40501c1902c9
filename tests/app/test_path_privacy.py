"""No server path reaches a user: an uploaded model is named by its file name in the frontier,
the plans, every export and the report, end to end through the API and a real worker."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from bitplan.app import worker
from bitplan.app.settings import Settings
from bitplan.search.exports import EXPORTS
from tests.app._api_fixtures import api_client, job_body
from tests.helpers import write_tiny_hf_model, zip_folder

UPLOAD_NAME = "my encoder.zip"


def _upload_model(client: TestClient, tmp_path: Path) -> str:
    folder = write_tiny_hf_model(tmp_path / "encoder")
    archive = zip_folder(folder, tmp_path / "encoder.zip")
    answer = client.post("/v1/models", files={"file": (UPLOAD_NAME, archive.read_bytes())})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def _upload_text(client: TestClient) -> str:
    lines = [f"sample sentence number {i} about quantization" for i in range(24)]
    answer = client.post("/v1/datasets", files={"file": ("notes.txt", "\n".join(lines).encode())})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def test_results_of_an_uploaded_model_name_it_by_its_file_name(
    settings: Settings, tmp_path: Path
) -> None:
    with api_client(settings) as client:
        model_id = _upload_model(client, tmp_path)
        body = job_body(model=model_id, calib=_upload_text(client), budget="6bpw")
        submitted = client.post("/v1/jobs", json=body)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        worker.run_worker(settings, once=True)
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "succeeded", job["error"]
        assert job["request"]["model"] == model_id

        frontier = client.get(f"/v1/jobs/{job_id}/frontier").json()
        assert frontier["model"]["ref"] == UPLOAD_NAME
        plan_id = frontier["points"][0]["plan_id"]
        plan = client.get(f"/v1/jobs/{job_id}/plans/{plan_id}").json()
        assert plan["model"]["ref"] == UPLOAD_NAME
        served = [client.get(f"/v1/jobs/{job_id}/report").text] + [
            client.get(f"/v1/jobs/{job_id}/plans/{plan_id}?format={export.name}").text
            for export in EXPORTS.values()
        ]

    server_folders = {str(settings.data_dir), str(settings.data_dir.resolve())}
    files = [path for path in settings.artifact_dir.rglob("*") if path.is_file()]
    written = [path.read_text(errors="replace") for path in files]
    for text in served + written:
        assert not any(folder in text for folder in server_folders)
