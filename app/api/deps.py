"""FastAPI dependencies shared by the routes: settings, a database session, the caller's key.

The app keeps its settings and session factory on ``app.state`` (set by
:func:`bitplan.app.main.create_app`), so every app instance — one per test — has its own database.
Sessions are only ever obtained through :data:`SessionDep`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from bitplan.app import crud
from bitplan.app.auth import authenticate
from bitplan.app.models import ApiKey
from bitplan.app.settings import Settings

__all__ = ["CurrentKeyDep", "OwnerDep", "PageCursor", "PageLimit", "SessionDep", "SettingsDep"]

# auto_error=False: a missing header must become our problem+json 401 (or pass when auth is off),
# not FastAPI's own 403.
_bearer = HTTPBearer(auto_error=False, description="an API key from `bitplan keys create NAME`")


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings  # set by create_app
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


# Methods that never write: their sessions skip SQLite's write lock (see make_sessionmaker).
_READ_METHODS = frozenset({"GET", "HEAD"})


def get_db(request: Request) -> Iterator[Session]:
    state = request.app.state
    factory = state.read_sessionmaker if request.method in _READ_METHODS else state.sessionmaker
    with factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]


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
PageCursor = Annotated[
    str | None, Query(description="the next_cursor of the previous page; omit for the first")
]
