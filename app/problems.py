"""RFC 9457 problem details: every error the API returns, in one shape.

Clients get ``application/problem+json`` bodies with ``type``, ``title``, ``status``, ``detail``
and ``instance`` for every failure: our own errors (:class:`ProblemError`), Starlette's HTTP
errors (404 for an unknown route, 405), FastAPI's request validation errors (with an extra
``errors`` list that points at the offending fields),
:class:`~bitplan.sensitivity.errors.InputError` raised anywhere below the API (422), a busy or
unreachable database (503 with ``Retry-After``: backpressure, not a failure; see
:func:`bitplan.app.db.is_transient`), and unhandled exceptions (500, logged, details withheld).
A route stopped because its client hung up is answered 499, which nobody reads.

``type`` is ``about:blank`` when the status code says it all (RFC 9457 §4.2.1); problems a client
may want to tell apart carry a ``tag:`` URI (RFC 4151), which names a kind without pretending to
be a web page. :func:`problem_responses` declares the error responses of a route in the OpenAPI
document so that every status code a route can answer is listed there.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Mount

from bitplan.app.db import is_transient
from bitplan.app.settings import Settings
from bitplan.sensitivity.errors import InputError

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "Problem",
    "ProblemError",
    "install_problems",
    "problem_response",
    "problem_responses",
    "problem_type",
    "service_busy",
]

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
_TYPE_PREFIX = "tag:bitplan,2025:problem/"


def problem_type(slug: str) -> str:
    """The ``type`` URI of one problem kind, e.g. ``problem_type("not-ready")``."""
    return _TYPE_PREFIX + slug


class Problem(BaseModel):
    """An RFC 9457 problem details object (extension members are allowed)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field("about:blank", description="URI naming the kind of problem")
    title: str = Field(description="short summary of the kind of problem")
    status: int = Field(description="the HTTP status code")
    detail: str | None = Field(None, description="what went wrong in this occurrence")
    instance: str | None = Field(None, description="the request path that failed")


class ProblemError(Exception):
    """Raise from a route to answer with a problem; ``slug`` picks a ``type`` URI."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.type = problem_type(slug) if slug else "about:blank"
        self.headers = headers
        self.extensions = extensions


def service_busy(settings: Settings, detail: str) -> ProblemError:
    """A 503 telling the client to come back after ``settings.busy_retry_after_s`` seconds."""
    return ProblemError(
        503,
        f"{detail}; retry after {settings.busy_retry_after_s} s",
        slug="busy",
        headers={"Retry-After": str(settings.busy_retry_after_s)},
    )


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem_response(
    status: int,
    detail: str | None,
    *,
    instance: str | None = None,
    type_: str = "about:blank",
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    """A problem+json response; ``extensions`` become extra top-level members."""
    body = Problem(
        type=type_,
        title=_title(status),
        status=status,
        detail=detail,
        instance=instance,
        **extensions,
    )
    return JSONResponse(
        body.model_dump(mode="json", exclude_none=True),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def _instance(request: Request) -> str:
    return request.url.path


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(
        exc.status,
        exc.detail,
        instance=_instance(request),
        type_=exc.type,
        headers=exc.headers,
        **exc.extensions,
    )


# The methods a 405's Allow header may list (RFC 9110 §9: the methods this API could serve).
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path.

    Starlette's 405 lists only the methods of the first route whose path matched, so a path
    served by two routes (``GET`` and ``POST /v1/jobs``) would advertise one method; RFC 9110
    §15.5.6 wants all of them. Each method is asked of the router itself (a route "fully
    matches" path and method), so the answer cannot drift from the routes. Mounted apps (the
    docs assets) are skipped: a mount matches every method and answers its own 405s.
    """
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        for route in request.app.router.routes:
            if not isinstance(route, Mount) and route.matches(scope)[0] is Match.FULL:
                allowed.append(method)
                break
    return allowed


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers) if exc.headers else {}
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        if allowed:
            headers["Allow"] = ", ".join(allowed)
    return problem_response(
        exc.status_code,
        str(exc.detail),
        instance=_instance(request),
        headers=headers or None,
    )


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc)


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": _field_path(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type")}
        for err in exc.errors()
    ]
    first = errors[0] if errors else {"loc": "request", "msg": "invalid"}
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return problem_response(
        422,
        f"{first['loc']}: {first['msg']}{more}",
        instance=_instance(request),
        type_=problem_type("validation"),
        errors=errors,
    )


async def _on_input_error(request: Request, exc: Exception) -> JSONResponse:
    return problem_response(
        422, str(exc), instance=_instance(request), type_=problem_type("invalid-input")
    )


async def _on_database_error(request: Request, exc: Exception) -> JSONResponse:
    if not is_transient(exc):
        return await _on_unhandled(request, exc)
    log.warning(
        "database busy on %s %s: %s", request.method, request.url.path, str(exc).partition("\n")[0]
    )
    settings: Settings = request.app.state.settings  # set by create_app
    return await _on_problem(request, service_busy(settings, "the database is busy"))


# nginx's status for a client that closed its connection before the answer (not in RFC 9110).
_CLIENT_CLOSED = 499


async def _on_disconnect(request: Request, exc: Exception) -> JSONResponse:
    """A route stopped because its client hung up: not a server error, and nobody reads the
    answer (the server drops it), so it is only noted."""
    log.info("the client of %s %s hung up before its answer", request.method, request.url.path)
    return problem_response(
        _CLIENT_CLOSED, "the client closed the connection", instance=_instance(request)
    )


async def _on_unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(
        500, "internal error; the server log has the details", instance=_instance(request)
    )


def install_problems(app: FastAPI) -> None:
    """Route every error of ``app`` through problem+json and add the ``Problem`` schema to its
    OpenAPI components (the routes' declared error responses refer to it)."""
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(InputError, _on_input_error)
    # The pool's TimeoutError is not a DBAPIError: both bases are needed.
    app.add_exception_handler(sa_exc.DBAPIError, _on_database_error)
    app.add_exception_handler(sa_exc.TimeoutError, _on_database_error)
    app.add_exception_handler(ClientDisconnect, _on_disconnect)
    app.add_exception_handler(Exception, _on_unhandled)
    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = base_openapi()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["Problem"] = Problem.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            # Every route declares its 422 as a Problem, so FastAPI's default validation-error
            # schemas are left unreferenced: drop them unless some route still points at one.
            paths = json.dumps(schema.get("paths", {}))
            if "#/components/schemas/HTTPValidationError" not in paths:
                components.pop("HTTPValidationError", None)
                components.pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries declaring problem+json bodies for ``statuses``.

    422 (validation), 500 (unhandled) and 503 (busy database, with ``Retry-After``) can happen
    on every route, so they are always included.
    """
    codes = sorted({*statuses, 422, 500, 503})
    return {
        code: {
            "description": _title(code),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for code in codes
    }
