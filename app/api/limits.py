"""Bounded request bodies, and authentication decided before any body byte is read.

FastAPI reads and parses a request's body before it solves the route's dependencies, so
without this module a client with no key could make the API hold a 1 GiB JSON body in memory
only to be told 401 afterwards, and a malformed body answered 422 before the missing key was
even noticed. :class:`BodyLimitMiddleware` is a pure ASGI middleware, outermost in the stack,
that wraps ``receive``. When the app first asks for the body — routing has run by then and
left the route in the scope — and before one byte is handed over, it

1. refuses, when keys are required, a route that needs a key if the request carries no
   well-formed ``Authorization: Bearer <token>`` header, with the dependency's own 401 — from
   the headers alone. Whether the token names a live key is still decided by
   :func:`bitplan.app.auth.authenticate` in the route's dependency (a database lookup);
2. picks the body's limit: ``max_upload_bytes`` (plus multipart framing) for upload routes,
   ``max_json_bytes`` for everything else, and refuses a ``Content-Length`` over it with 413.

It then counts the bytes as they pass and stops a chunked body with 413 as soon as it passes
the limit, so at most one chunk beyond the limit is ever held. Requests whose body no route
reads (a GET, a 404, a 405) are never checked here: nothing of their body is read.

A route "needs a key" when its dependencies include the key lookup, and it is an upload route
when its OpenAPI request body is ``multipart/form-data``: both facts are read from the route
itself, so no second list of paths can drift from the routes.

:func:`install_body_limits` also makes FastAPI's bare 400 for a body it cannot parse (a JSON
body that is not UTF-8, say) name what was wrong, and declares that 400 and the 413 in the
OpenAPI document of every operation with a request body. Malformed multipart framing is
answered by the upload reader itself (:mod:`bitplan.app.uploads`), which sees the parser's
errors first.

References: ASGI HTTP spec (https://asgi.readthedocs.io/en/latest/specs/www.html);
RFC 6750 §2.1 (the ``b64token`` syntax of a bearer token); RFC 9110 §15.5.14 (413).
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.responses import Response
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bitplan.app.api.deps import get_current_key
from bitplan.app.auth import authenticate
from bitplan.app.problems import ProblemError, problem_response, problem_responses, problem_type
from bitplan.app.settings import Settings
from bitplan.app.uploads import _FRAMING_SLACK, _too_large

__all__ = ["BodyLimitMiddleware", "install_body_limits"]

log = logging.getLogger(__name__)

_API_PREFIX = "/v1/"
_MULTIPART = "multipart/form-data"
# RFC 6750 §2.1: credentials = "Bearer" 1*SP b64token; b64token = 1*(ALPHA / DIGIT /
# "-" / "." / "_" / "~" / "+" / "/") *"=". The scheme is case-insensitive (RFC 9110 §11.1).
_BEARER_RE = re.compile(r"bearer +[A-Za-z0-9\-._~+/]+=*", re.IGNORECASE)
_MALFORMED = "malformed-body"


class _Refused(Exception):
    """Raised from ``receive`` instead of handing the app a body it must not read."""


@dataclass(frozen=True)
class _RouteRules:
    """What the middleware must know of the route that reads a body."""

    needs_key: bool
    upload: bool


def _depends_on_key(dependant: Dependant) -> bool:
    return any(
        sub.call is get_current_key or _depends_on_key(sub) for sub in dependant.dependencies
    )


def _takes_multipart(route: APIRoute) -> bool:
    content = (route.openapi_extra or {}).get("requestBody", {}).get("content", {})
    return _MULTIPART in content


def _has_bearer(headers: Headers) -> bool:
    return _BEARER_RE.fullmatch(headers.get("authorization", "").strip()) is not None


def _missing_key(settings: Settings) -> ProblemError:
    """The dependency's own 401 for a request without a key (one message, one challenge)."""
    try:
        # Never queried: authenticate refuses a missing token before any key lookup.
        with Session() as unused:
            authenticate(unused, settings=settings, token=None)
    except ProblemError as exc:
        return exc
    raise AssertionError("authenticate accepted a request without a key although keys are on")


def _json_too_large(max_bytes: int) -> ProblemError:
    return ProblemError(
        413,
        f"request body exceeds the limit of {max_bytes} bytes (BITPLAN_MAX_JSON_BYTES)",
        slug="body-too-large",
        max_bytes=max_bytes,
    )


async def _answer(problem: ProblemError, scope: Scope, receive: Receive, send: Send) -> None:
    response = problem_response(
        problem.status,
        problem.detail,
        instance=scope["path"],
        type_=problem.type,
        headers=problem.headers,
        **problem.extensions,
    )
    await response(scope, receive, send)


class BodyLimitMiddleware:
    """Pure ASGI middleware: a header-only key check and a streamed byte limit, applied when
    the app first asks for the body (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._rules: dict[int, _RouteRules] = {}  # by id() of the APIRoute: routes never die

    def rules(self, scope: Scope) -> _RouteRules:
        """The rules of the route that reads this body. Routing has run by then and left the
        route in the scope; a body read before routing (no route yet) gets the strict rules of
        its path and content type."""
        route = scope.get("route")
        if not isinstance(route, APIRoute):
            content_type = Headers(scope=scope).get("content-type", "")
            return _RouteRules(
                needs_key=scope["path"].startswith(_API_PREFIX),
                upload=content_type.startswith(_MULTIPART),
            )
        rules = self._rules.get(id(route))
        if rules is None:
            rules = _RouteRules(
                needs_key=_depends_on_key(route.dependant), upload=_takes_multipart(route)
            )
            self._rules[id(route)] = rules
        return rules

    def admit(self, scope: Scope) -> tuple[int, ProblemError]:
        """The byte limit of this body and the 413 past it; raises the refusal (401, or 413 for
        a declared length over the limit) when not one byte of it may be read."""
        rules = self.rules(scope)
        headers = Headers(scope=scope)
        if self.settings.keys_required and rules.needs_key and not _has_bearer(headers):
            log.info("refused %s %s without an API key", scope["method"], scope["path"])
            raise _missing_key(self.settings)
        if rules.upload:
            limit = self.settings.max_upload_bytes + _FRAMING_SLACK
            too_large = _too_large(self.settings.max_upload_bytes)
        else:
            limit = self.settings.max_json_bytes
            too_large = _json_too_large(limit)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            log.info("refused a %s-byte body on %s (limit %d)", declared, scope["path"], limit)
            raise too_large
        return limit, too_large

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await _Guarded(self, scope, receive, send).run()


class _Guarded:
    """One HTTP request: checks it when the app first asks for its body, counts the body, and
    answers the refusal as soon as there is one.

    Whatever the app makes of the exception raised from ``receive`` (FastAPI turns any error
    while reading a body into a 400), the client gets the refusal: a response the app starts
    after it is replaced by it, and an exception the app lets through is answered with it.
    """

    def __init__(
        self, middleware: BodyLimitMiddleware, scope: Scope, receive: Receive, send: Send
    ) -> None:
        self.middleware = middleware
        self.scope, self.receive, self.send = scope, receive, send
        self.limit: int | None = None  # set when the app first asks for the body
        self.too_large: ProblemError | None = None
        self.consumed = 0
        self.refusal: ProblemError | None = None
        self.started = False
        self.answered = False

    async def run(self) -> None:
        try:
            await self.middleware.app(self.scope, self.guarded_receive, self.guarded_send)
        except Exception:
            if self.refusal is None or self.started:
                raise
            await self.answer()

    def refuse(self, problem: ProblemError) -> _Refused:
        self.refusal = problem
        return _Refused(problem.detail)

    async def guarded_receive(self) -> Message:
        if self.refusal is not None:
            raise _Refused(self.refusal.detail)
        if self.limit is None and not self.started:  # after the response starts: only disconnects
            try:
                self.limit, self.too_large = self.middleware.admit(self.scope)
            except ProblemError as problem:
                raise self.refuse(problem) from None
        message = await self.receive()
        if message["type"] == "http.request" and self.limit is not None:
            self.consumed += len(message.get("body", b""))
            if self.consumed > self.limit:
                assert self.too_large is not None
                log.info("stopped a body on %s past %d bytes", self.scope["path"], self.limit)
                raise self.refuse(self.too_large)
        return message

    async def guarded_send(self, message: Message) -> None:
        if self.answered:
            return  # the rest of the app's own response: the client has the refusal
        if message["type"] == "http.response.start":
            if self.refusal is not None:
                await self.answer()
                return
            self.started = True
        await self.send(message)

    async def answer(self) -> None:
        if self.answered:
            return
        assert self.refusal is not None
        self.answered = True
        await _answer(self.refusal, self.scope, self.receive, self.send)


# An exception handler as Starlette stores it: sync or async, any response.
_Handler = Callable[[Request, Any], Response | Awaitable[Response]]


def _explain_parse_errors(previous: _Handler) -> _Handler:
    """Wrap the HTTP-error handler so FastAPI's bare 400 ("There was an error parsing the
    body", raised from the real error) says what was wrong with the body."""

    async def handler(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        cause = exc.__cause__
        if exc.status_code != 400 or cause is None:
            response = previous(request, exc)
            return await response if inspect.isawaitable(response) else response
        reason = str(cause) or type(cause).__name__
        return problem_response(
            400,
            f"the request body could not be parsed: {reason}",
            instance=request.url.path,
            type_=problem_type(_MALFORMED),
        )

    return handler


def _declare_body_problems(app: FastAPI) -> None:
    """Declare the 400 (unparsable body) and 413 (body over its limit) problems in the OpenAPI
    responses of every operation with a request body: this middleware can answer either."""
    base_openapi = app.openapi
    declared = problem_responses(400, 413)

    def openapi() -> dict[str, Any]:
        schema = base_openapi()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if isinstance(operation, dict) and "requestBody" in operation:
                    responses = operation.setdefault("responses", {})
                    for code in (400, 413):
                        responses.setdefault(str(code), declared[code])
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_body_limits(app: FastAPI, settings: Settings) -> None:
    """Bound bodies and check keys before reading them (outermost middleware), make the 400 for
    a body that cannot be parsed say why, and declare that 400 and the 413 in OpenAPI.

    Call after :func:`bitplan.app.problems.install_problems` (its HTTP-error handler and
    OpenAPI hook are wrapped here) and after any other ``add_middleware``: the middleware
    added last runs first, and this one must run before anything reads a body.
    """
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    previous = app.exception_handlers[StarletteHTTPException]
    app.add_exception_handler(StarletteHTTPException, _explain_parse_errors(previous))
    _declare_body_problems(app)
