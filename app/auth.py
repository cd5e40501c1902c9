"""API-key authentication: ``Authorization: Bearer <key>``, scoped ownership, and the auth mode.

With keys enabled every resource belongs to the key that created it and another key gets 404
for it (the routes pass the key's id as ``owner_id`` to every CRUD call). With keys disabled
everything belongs to nobody (``owner_id`` None) and any ``Authorization`` header is ignored.

Keys are required whenever the server listens on anything other than loopback: ``auth="auto"``
turns them on for such a host, and ``auth="off"`` with such a host is a configuration error
rather than an open server.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from bitplan.app import crud
from bitplan.app.models import ApiKey
from bitplan.app.problems import ProblemError
from bitplan.app.settings import Settings
from bitplan.sensitivity.errors import InputError

__all__ = ["auth_required", "authenticate"]

log = logging.getLogger(__name__)

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="bitplan"'}


def auth_required(settings: Settings) -> bool:
    """Whether requests must carry an API key under ``settings``.

    Raises :class:`InputError` for ``auth=off`` on a non-loopback host: an open server is refused
    rather than started.
    """
    exposed = settings.model_copy(update={"auth": "auto"}).keys_required
    if settings.auth == "off" and exposed:
        raise InputError(
            f"auth=off is only allowed on a loopback host, not {settings.host!r}; "
            "set BITPLAN_AUTH=on (or auto) and create a key with `bitplan keys create NAME`"
        )
    return settings.keys_required


def authenticate(session: Session, *, settings: Settings, token: str | None) -> ApiKey | None:
    """The API key whose plaintext is ``token`` (from ``Authorization: Bearer``), None when
    auth is off; 401 when a key is required and ``token`` is missing, unknown or revoked.
    ``settings`` passed :func:`auth_required` when the app was created, so this per-request
    check reads the mode without validating it again."""
    if not settings.keys_required:
        return None
    if not token:
        raise ProblemError(
            401,
            "this server needs an API key: send 'Authorization: Bearer <key>'",
            slug="unauthenticated",
            headers=_CHALLENGE,
        )
    key = crud.find_api_key(session, plaintext=token)
    if key is None or key.revoked_at is not None:
        log.info("rejected an unknown or revoked API key")
        raise ProblemError(
            401,
            "the API key is unknown or revoked; create one with `bitplan keys create NAME`",
            slug="unauthenticated",
            headers=_CHALLENGE,
        )
    return key
