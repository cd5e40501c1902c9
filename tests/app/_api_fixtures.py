"""Helpers for the HTTP tests of the API: a client per app, problem+json checks, and a way to
make a job "succeed" without a worker (row update + artifact files written by the test)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from bitplan.app import crud
from bitplan.app.db import make_sessionmaker
from bitplan.app.main import create_app
from bitplan.app.models import Job, utcnow
from bitplan.app.settings import Settings
from bitplan.search.plans import Plan, write_frontier
from bitplan.search.spec import JobSpec
from bitplan.sensitivity.format_spec import parse_format

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


# Planned bytes of the one 10 x 64 layer of :func:`plan_document` in each format (DESIGN §3):
# int4-g32: ceil((640·4 + 20 groups·16) / 8) = 360; int8 (a scale a row): ceil((640·8 + 10·16) / 8)
PLAN_LAYER_BYTES = {"int4-g32": 360, "int8": 660}
_UNPLANNED_BYTES, _FP16_BYTES = 40, 1320


def plan_document(fmt: str = "int4-g32") -> dict[str, Any]:
    """A one-layer plan in the v1 format of DESIGN §4 (totals consistent with the byte rules)."""
    planned = PLAN_LAYER_BYTES[fmt]
    bits = parse_format(fmt).bits
    total = planned + _UNPLANNED_BYTES
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
                "format": fmt,
                "bits": bits,
                "group_size": parse_format(fmt).group_size,
                "symmetric": True,
                "bytes": planned,
            }
        ],
        "totals": {
            "planned_bytes": planned,
            "unplanned_bytes": _UNPLANNED_BYTES,
            "total_bytes": total,
            "bpw": 8 * planned / 640,
            "fp16_bytes": _FP16_BYTES,
            "ratio_vs_fp16": total / _FP16_BYTES,
        },
        "metrics": {"predicted_error": 0.01, "calibration": {}, "holdout": {"accuracy": 0.9}},
    }


def finish_job(
    app: FastAPI, job_id: str, *, state: str = "succeeded", n_plans: int = 1, report: bool = True
) -> list[str]:
    """Write a job's artifacts as a worker would, mark the row ``state``; returns plan ids,
    smallest plan first (at most one plan a format of :data:`PLAN_LAYER_BYTES`)."""
    settings: Settings = app.state.settings
    out = settings.artifact_dir / job_id
    plans = [(Plan.from_dict(plan_document(fmt)), "exact") for fmt in PLAN_LAYER_BYTES][:n_plans]
    frontier = write_frontier(
        out,
        model_ref="builtin:digits-cnn",
        model_sha256="0" * 64,
        budget=None,
        points=plans,
        best=plans[0][0] if plans else None,  # as a job does: plans/best.json
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


def enqueue_job(engine: Engine, *, max_attempts: int = 3, **spec_fields: Any) -> str:
    """Queue one job straight into the database (no API), as ``POST /v1/jobs`` would."""
    spec = JobSpec(**{"model": "builtin:digits-cnn", "budget": "4bpw", **spec_fields}).to_dict()
    with make_sessionmaker(engine)() as session:
        return crud.create_job(
            session,
            owner_id=None,
            spec=spec,
            model_id=None,
            dataset_id=None,
            idempotency_key=None,
            request_hash=None,
            max_attempts=max_attempts,
        ).id
