"""A job's per-stage costs reach the API: the worker keeps the runner's ``stages`` in the job
result, and ``GET /v1/jobs/{id}`` shows them once the job succeeded (empty for a runner that
records none, as for jobs finished before the service recorded them)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bitplan.app import worker
from bitplan.app.settings import Settings
from bitplan.search.spec import JobSpec
from tests.app._api_fixtures import api_client, job_body

STAGES = [
    {
        "stage": "load",
        "seconds": 1.5,
        "peak_rss_bytes": 123456789,
        "peak_gpu_bytes": 5678,
        "forward_equivalents": 0.0,
    },
    {
        "stage": "search",
        "seconds": 4.25,
        "peak_rss_bytes": None,
        "peak_gpu_bytes": None,
        "forward_equivalents": 3.5,
    },
]
# A result recorded before GPU memory was measured has no "peak_gpu_bytes": it reads as null.
OLD_STAGES = [{k: v for k, v in stage.items() if k != "peak_gpu_bytes"} for stage in STAGES]


def _write_plan(out_dir: Path) -> None:
    (out_dir / "plans").mkdir(parents=True)
    (out_dir / "plans" / "plan-0001.json").write_text(json.dumps({"layers": []}))
    (out_dir / "frontier.json").write_text(json.dumps({"schema": "bitplan.frontier/v1"}))


def staged_runner(spec: JobSpec, *, out_dir: Path, **_: Any) -> SimpleNamespace:
    _write_plan(out_dir)
    return SimpleNamespace(stages=STAGES)  # what run_job's JobResult carries


def old_runner(spec: JobSpec, *, out_dir: Path, **_: Any) -> SimpleNamespace:
    _write_plan(out_dir)
    return SimpleNamespace(stages=OLD_STAGES)


def silent_runner(spec: JobSpec, *, out_dir: Path, **_: Any) -> None:
    _write_plan(out_dir)


def _run_one(settings: Settings, runner: Any) -> dict[str, Any]:
    with api_client(settings) as client:
        job_id = client.post("/v1/jobs", json=job_body()).json()["id"]
        assert client.get(f"/v1/jobs/{job_id}").json()["stages"] == []  # queued: none yet
        assert worker.run_worker(settings, once=True, runner=runner) == 1
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded"
    return job


def test_a_succeeded_job_shows_the_stages_its_runner_recorded(settings: Settings) -> None:
    assert _run_one(settings, staged_runner)["stages"] == STAGES


def test_a_runner_without_stages_leaves_the_list_empty(settings: Settings) -> None:
    assert _run_one(settings, silent_runner)["stages"] == []


def test_stages_recorded_without_gpu_memory_read_as_null(settings: Settings) -> None:
    stages = _run_one(settings, old_runner)["stages"]
    assert [s["peak_gpu_bytes"] for s in stages] == [None, None]
    assert [s["peak_rss_bytes"] for s in stages] == [123456789, None]
