"""Helpers for the HTTP tests of the API: a client per app, problem+json checks, and a way to
make a job "succeed" without a worker (row update + artifact files written by the test)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient

from bitplan.app.main import create_app
from bitplan.app.models import Job, utcnow
from bitplan.app.settings import Settings
from bitplan.search.plans import Plan, write_frontier

PROBLEM_MEDIA_TYPE = "application/problem+json"


@contextmanager
def api_client(settings: Settings, **headers: str) -> Iterator[TestClient]:
    """A TestClient on a fresh app for ``settings`` (lifespan run, engine disposed after)."""
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False, headers=headers) as client:
        yield client


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """Check the RFC 9457 shape of an error answer and return its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE)
    body = response.json()
    assert body["status"] == status
    assert isinstance(body["type"], str) and body["type"]
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["instance"] == response.request.url.path
    return body


def job_body(**overrides: Any) -> dict[str, Any]:
    """A small valid job request on the builtin digits model."""
    return {
        "model": "builtin:digits-cnn",
        "budget": "4.5bpw",
        "method": "weight",
        "trials": 2,
        **overrides,
    }


def plan_document() -> dict[str, Any]:
    """A one-layer plan in the v1 format of DESIGN §4 (totals consistent with the byte rules)."""
    return {
        "schema": "bitplan.plan/v1",
        "model": {"ref": "builtin:digits-cnn", "sha256": "0" * 64},
        "budget": {"kind": "bpw", "value": 4.5},
        "layers": [
            {
                "name": "h.0.mlp.c_fc",
                "param": "h.0.mlp.c_fc.weight",
                "kind": "linear",
                "shape": [10, 64],
                "numel": 640,
                "tie": None,
                "format": "int4-g32",
                "bits": 4,
                "group_size": 32,
                # ceil((640·4 + 20 groups·16) / 8) = 360 bytes (DESIGN §3)
                "symmetric": True,
                "bytes": 360,
            }
        ],
        "totals": {
            "planned_bytes": 360,
            "unplanned_bytes": 40,
            "total_bytes": 400,
            "bpw": 4.5,
            "fp16_bytes": 1320,
            "ratio_vs_fp16": 400 / 1320,
        },
        "metrics": {"predicted_error": 0.01, "calibration": {}, "holdout": {"accuracy": 0.9}},
    }


def finish_job(
    app: FastAPI, job_id: str, *, state: str = "succeeded", n_plans: int = 1, report: bool = True
) -> list[str]:
    """Write a job's artifacts as a worker would, mark the row ``state``; returns plan ids."""
    settings: Settings = app.state.settings
    out = settings.artifact_dir / job_id
    plans = [(Plan.from_dict(plan_document()), "exact") for _ in range(n_plans)]
    frontier = write_frontier(
        out, model_ref="builtin:digits-cnn", model_sha256="0" * 64, budget=None, points=plans
    )
    plan_ids = [point.plan_id for point in frontier.points]
    (out / "sensitivity.csv").write_text(
        "layer,param,format,error\nh.0.mlp.c_fc,h.0.mlp.c_fc.weight,int4-g32,0.01\n"
    )
    if report:
        (out / "report.html").write_text("<html><body>report</body></html>")
    with app.state.sessionmaker() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state, job.stage, job.progress = state, state, 1.0
        job.finished_at = utcnow()
        job.result = {"artifact_dir": str(out), "plan_ids": plan_ids}
        session.commit()
    return plan_ids
