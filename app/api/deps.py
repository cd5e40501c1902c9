"""FastAPI dependencies shared by the routes: settings, a database session, the caller's key.

The app keeps its settings and session factory on ``app.state`` (set by
:func:`bitplan.app.main.create_app`), so every app instance — one per test — has its own database.
Sessions are only ever obtained through :data:`SessionDep`.

Backpressure: a request waits (without a thread) for one of a fixed number of database slots
before its session opens, and gets 503 + ``Retry-After`` when none frees up within
``db_pool_timeout_s``. Without that gate a burst deadlocks: every threadpool thread blocks
waiting for a pooled connection or SQLite's write lock, while the requests holding them need
a thread to run their session's teardown (FastAPI runs a sync dependency's exit in the
threadpool), so everything times out as 500s. The slots are fewer than the pool's connections
and than half the threadpool, so a request that holds a slot always gets a connection, and a
thread to give it back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from bitplan.app import crud
from bitplan.app.auth import authenticate
from bitplan.app.models import ApiKey
from bitplan.app.problems import service_busy
from bitplan.app.settings import Settings

__all__ = [
    "CurrentKeyDep",
    "EngineDep",
    "OwnerDep",
    "PageCursor",
    "PageLimit",
    "SessionDep",
    "SettingsDep",
]

# auto_error=False: a missing header must become our problem+json 401 (or pass when auth is off),
# not FastAPI's own 403.
_bearer = HTTPBearer(auto_error=False, description="an API key from `bitplan keys create NAME`")


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings  # set by create_app
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


# Methods that never write: their sessions skip SQLite's write lock (see make_sessionmaker).
_READ_METHODS = frozenset({"GET", "HEAD"})


def db_slots(settings: Settings) -> int:
    """How many requests may hold a database session at once."""
    threads = int(anyio.to_thread.current_default_thread_limiter().total_tokens)
    return max(1, min(settings.db_pool_size + settings.db_max_overflow, threads // 2))


def _gate(request: Request, settings: Settings) -> asyncio.Semaphore:
    """The app's slot semaphore, made on first use in the running event loop (an asyncio
    semaphore belongs to one loop; a test client may run an app in several in turn)."""
    loop = asyncio.get_running_loop()
    gate: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = getattr(
        request.app.state, "db_gate", None
    )
    if gate is None or gate[0] is not loop:
        gate = (loop, asyncio.Semaphore(db_slots(settings)))
        request.app.state.db_gate = gate
    return gate[1]


async def _db_slot(request: Request, settings: SettingsDep) -> AsyncIterator[None]:
    semaphore = _gate(request, settings)
    try:
        await asyncio.wait_for(semaphore.acquire(), timeout=settings.db_pool_timeout_s)
    except TimeoutError:
        raise service_busy(settings, "the server is at capacity") from None
    try:
        yield
    finally:
        semaphore.release()


def get_db(request: Request, _slot: Annotated[None, Depends(_db_slot)]) -> Iterator[Session]:
    state = request.app.state
    factory = state.read_sessionmaker if request.method in _READ_METHODS else state.sessionmaker
    with factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]


async def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine  # set by create_app
    return engine


# For the rare GET that also writes (queueing a model export): it reads with its SessionDep,
# ends that read transaction, then writes in a transaction of its own on the engine (a SQLite
# read transaction must not turn into a write; see make_sessionmaker).
EngineDep = Annotated[Engine, Depends(get_engine)]


def get_current_key(
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey | None:
    return authenticate(
        session, settings=settings, token=credentials.credentials if credentials else None
    )


CurrentKeyDep = Annotated[ApiKey | None, Depends(get_current_key)]


async def get_owner_id(key: CurrentKeyDep) -> str | None:
    """The id every resource of this request belongs to (None when keys are off)."""
    return key.id if key is not None else None


OwnerDep = Annotated[str | None, Depends(get_owner_id)]

# The query parameters of every list route.
PageLimit = Annotated[
    int, Query(ge=1, le=crud.MAX_PAGE, description="how many items a page holds at most")
]
# A cursor is base64url without padding (crud's encoding of the last row's time and id): ~100
# characters; the bound only keeps a client from sending a megabyte of "cursor".
_MAX_CURSOR_LENGTH = 512


def _first_page_if_empty(value: str | None) -> str | None:
    """``?cursor=`` (empty, as a client that templates the previous page's null cursor sends)
    means the first page, as an omitted cursor does."""
    return value or None


PageCursor = Annotated[
    str | None,
    Query(
        max_length=_MAX_CURSOR_LENGTH,
        pattern="^[A-Za-z0-9_-]*$",
        description="the next_cursor of the previous page; omit (or leave empty) for the first",
    ),
    AfterValidator(_first_page_if_empty),
]
