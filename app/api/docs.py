"""Interactive API docs (``/docs``, ``/redoc``) that work without internet access.

FastAPI's built-in pages load Swagger UI and ReDoc from a CDN, so on an offline machine (or
behind a strict proxy) ``/docs`` is a blank page. Here the same pages are built with FastAPI's
documented custom-docs helpers (``get_swagger_ui_html`` / ``get_redoc_html``, see "Custom Docs UI
Static Assets (Self-Hosting)" in FastAPI's docs) and point at files served by this app, taken from
the ``fastapi-offline`` package, which ships the swagger-ui-dist and ReDoc bundles FastAPI uses.
Create the app with ``docs_url=None, redoc_url=None`` and call :func:`install_docs`.

:func:`document_auth` makes the OpenAPI document say whether requests need an API key: the
routes always declare the bearer scheme (their key dependency is the same in both modes), but a
server with keys off ignores ``Authorization``, and a document that still declared the scheme
would tell clients (and fuzzers) that a request without a key is refused.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["DOCS_ASSETS_URL", "document_auth", "install_docs"]

DOCS_ASSETS_URL = "/docs-assets"
# swagger-ui's default validatorUrl sends the spec to validator.swagger.io for a badge: off.
_SWAGGER_PARAMETERS = {"validatorUrl": None}


def _assets_dir() -> Path:
    """The folder of swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png."""
    return Path(str(files("fastapi_offline") / "static"))


def install_docs(app: FastAPI, *, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve Swagger UI at ``docs_url`` and ReDoc at ``redoc_url`` from local assets."""
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError(
            "create the app with docs_url=None, redoc_url=None: install_docs serves them"
        )
    openapi_url = app.openapi_url
    if openapi_url is None:
        raise ValueError("the app has no OpenAPI schema to document (openapi_url=None)")
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=_assets_dir()), name="docs-assets")

    def _url(request: Request, path: str) -> str:
        return f"{request.scope.get('root_path', '')}{path}"  # behind a proxy's path prefix

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=_url(request, openapi_url),
            title=f"{app.title} - Swagger UI",
            swagger_js_url=_url(request, f"{DOCS_ASSETS_URL}/swagger-ui-bundle.js"),
            swagger_css_url=_url(request, f"{DOCS_ASSETS_URL}/swagger-ui.css"),
            swagger_favicon_url=_url(request, f"{DOCS_ASSETS_URL}/favicon.png"),
            swagger_ui_parameters=_SWAGGER_PARAMETERS,
        )

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=_url(request, openapi_url),
            title=f"{app.title} - ReDoc",
            redoc_js_url=_url(request, f"{DOCS_ASSETS_URL}/redoc.standalone.js"),
            redoc_favicon_url=_url(request, f"{DOCS_ASSETS_URL}/favicon.png"),
            with_google_fonts=False,
        )


def document_auth(app: FastAPI, *, keys_required: bool) -> None:
    """Keep the bearer security scheme in ``app``'s OpenAPI document only when keys are
    required; with keys off, drop it from the components and from every operation."""
    if keys_required:
        return
    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = base_openapi()
        schema.get("components", {}).pop("securitySchemes", None)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if isinstance(operation, dict):
                    operation.pop("security", None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
