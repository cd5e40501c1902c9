"""The REST API under ``/v1``: one router per resource, assembled by :data:`api_router`.

Routes stay thin: they authenticate (``CurrentKeyDep``), call keyword-only CRUD functions with
the caller's ``owner_id`` and translate results into schemas and problem+json errors.
"""

from __future__ import annotations

from fastapi import APIRouter

from bitplan.app.api.routes import datasets, health, jobs, model_export, models

__all__ = ["api_router"]

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(models.router)
api_router.include_router(datasets.router)
api_router.include_router(jobs.router)
api_router.include_router(model_export.router)
