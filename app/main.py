"""The FastAPI application factory.

``create_app(settings)`` builds one self-contained app: its own engine and session factory on
``app.state`` (so tests run many apps side by side, each on its own database), problem+json
for every error, the ``/v1`` routers, and ``/docs`` and ``/redoc`` served without a CDN. It does
not migrate the database — ``bitplan db upgrade`` and ``bitplan serve`` do that before the app
starts — and it never runs jobs: worker processes claim them from the database queue.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from bitplan.app.api import api_router
from bitplan.app.api.docs import document_auth, install_docs
from bitplan.app.api.limits import install_body_limits
from bitplan.app.auth import auth_required
from bitplan.app.db import engine_for, make_sessionmaker
from bitplan.app.problems import install_problems
from bitplan.app.settings import Settings, get_settings
from bitplan.app.sweeper import sweeping

__all__ = ["create_app"]

log = logging.getLogger(__name__)

_DESCRIPTION = (
    "Mixed-precision quantization planning: upload a model and calibration data, submit a job "
    "with a memory budget, and download the size/quality frontier and per-layer plans. Errors "
    "are RFC 9457 application/problem+json."
)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for ``settings`` (default: the environment's ``BITPLAN_*`` settings)."""
    settings = settings or get_settings()
    keys = auth_required(settings)  # refuses auth=off on a non-loopback host before serving
    engine = engine_for(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        log.info(
            "bitplan API on %s (API keys %s)",
            engine.url.render_as_string(),
            "required" if keys else "off",
        )
        with sweeping(settings, _app.state.sessionmaker):  # at start-up, then periodically
            yield
        engine.dispose()

    # /docs and /redoc come from install_docs, which serves their assets locally (no CDN).
    app = FastAPI(
        title="bitplan",
        description=_DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.read_sessionmaker = make_sessionmaker(engine, read_only=True)
    install_problems(app)
    app.include_router(api_router)
    install_docs(app)
    document_auth(app, keys_required=keys)
    install_body_limits(app, settings)  # last: its middleware must run before all others
    return app
