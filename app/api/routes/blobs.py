"""Routes shared by uploaded resources (models, datasets): upload, list, get, delete.

Models and datasets behave identically except for how an upload is validated and which schema
describes them, so :func:`blob_router` builds both routers from those two differences.
Validation runs in child processes with limits (:mod:`bitplan.app.validation`), a few at once:
a model upload that finds them all busy is told 503 before a byte of its body is read.

Upload answers 201 with ``Location`` for new bytes and 200 with the existing resource when the
same owner uploads the same bytes again (content addressing by sha256). Files are stored per
owner under ``upload_dir/<kind>s/<owner>/<sha256><suffix>``, so deleting one owner's resource
never touches another owner's file.

The stored file exists before its row (temp name, fsync, rename, then insert): when validation
or the insert fails the file is removed unless another row uses it, and a process killed in
between leaves a file without a row, which :mod:`bitplan.app.sweeper` removes later. The same
bytes uploaded again under another suffix land on another path: the existing row is answered
and the new file removed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request, Response, status
from fastapi import Path as PathParam
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.requests import ClientDisconnect

from bitplan.app import crud
from bitplan.app.api.deps import OwnerDep, PageCursor, PageLimit, SessionDep, SettingsDep
from bitplan.app.models import Blob
from bitplan.app.problems import ProblemError, problem_responses
from bitplan.app.settings import Settings
from bitplan.app.uploads import UPLOAD_FIELD, StoredUpload, receive_upload
from bitplan.app.validation import ValidationSlots, validation_slots
from bitplan.sensitivity.errors import InputError

__all__ = ["Validator", "blob_router"]

log = logging.getLogger(__name__)

# await validate(stored_upload, settings, slots, request) raises InputError for a file that is
# not acceptable, ProblemError 503 when it cannot be checked now, ClientDisconnect when the
# client of request hung up during the check.
Validator = Callable[[StoredUpload, Settings, ValidationSlots, Request | None], Awaitable[None]]

BlobId = Annotated[str, PathParam(description="the model's or dataset's id")]
# A client that hashed a file asks whether the server already has its bytes, in one request.
Sha256Filter = Annotated[
    str | None,
    Query(
        pattern="^[0-9a-fA-F]{64}$",
        description="only the upload of these bytes: their sha256 as 64 hex digits",
    ),
]
_LOCATION = {"Location": {"description": "the resource's URL", "schema": {"type": "string"}}}


def _multipart_body(kind: str) -> dict[str, Any]:
    """OpenAPI request body of an upload (the route reads the raw stream, so FastAPI cannot
    infer it)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [UPLOAD_FIELD],
                        "properties": {
                            UPLOAD_FIELD: {
                                "type": "string",
                                "format": "binary",
                                "description": f"the {kind} file",
                            }
                        },
                    }
                }
            },
        }
    }


def _owner_dir(settings: Settings, kind: str, owner_id: str | None) -> Path:
    return settings.upload_dir / f"{kind}s" / (owner_id or "public")


def _remove_if_unused(session: Session, path: str) -> None:
    if not crud.blob_path_in_use(session, path=path):
        Path(path).unlink(missing_ok=True)


def _known(session: Session, *, owner_id: str | None, kind: str, sha256: str) -> bool:
    """Whether the owner already has these bytes (validated when they were first uploaded)."""
    found, _ = crud.list_blobs(session, owner_id=owner_id, kind=kind, sha256=sha256, limit=1)
    return bool(found)


def _discard_upload(session: Session, path: str, *, failed: bool = True) -> None:
    """Remove an upload's file unless a row uses it: after a failed upload (``failed``: its
    transaction is rolled back first), or when the existing row that answered it keeps the same
    bytes under another name. When even that lookup fails (the database is down), leave the
    file to the sweeper rather than risk another's bytes."""
    try:
        if failed:
            session.rollback()
        _remove_if_unused(session, path)
    except Exception:
        log.warning("left %s to the sweeper: could not check whether a row uses it", path)


def _validated(validate: Validator, kind: str) -> Validator:
    """``validate`` with any unexpected failure turned into an :class:`InputError`: whatever a
    hostile file makes a parser raise is the file's fault (422), not the server's (500)."""

    async def run(
        stored: StoredUpload, settings: Settings, slots: ValidationSlots, request: Request | None
    ) -> None:
        try:
            await validate(stored, settings, slots, request)
        except (InputError, ProblemError, ClientDisconnect):
            raise
        except Exception as exc:
            log.warning("%s %s failed validation", kind, stored.filename, exc_info=True)
            raise InputError(
                f"{stored.filename} cannot be read as a {kind} ({type(exc).__name__})"
            ) from None

    return run


def blob_router(
    *,
    kind: str,
    read_schema: type[BaseModel],
    list_schema: type[BaseModel],
    validate: Validator,
    always_in_child: bool = False,
) -> APIRouter:
    """The ``/v1/<kind>s`` router: POST (upload), GET list, GET one, DELETE.

    ``always_in_child``: every upload of this kind is validated in a child process, so an
    upload that finds no free slot is refused before its body is read.
    """
    plural = f"{kind}s"
    check = _validated(validate, kind)
    router = APIRouter(prefix=f"/v1/{plural}", tags=[plural])

    @router.post(
        "",
        response_model=read_schema,
        status_code=status.HTTP_201_CREATED,
        summary=f"Upload a {kind}",
        openapi_extra=_multipart_body(kind),
        responses={
            200: {
                "description": "the same bytes were uploaded before: the existing resource",
                "model": read_schema,
            },
            201: {"description": f"a new {kind}", "headers": _LOCATION},
            **problem_responses(401, 413, 415, 503),
        },
    )
    async def upload(
        request: Request,
        response: Response,
        session: SessionDep,
        settings: SettingsDep,
        owner_id: OwnerDep,
    ) -> Blob:
        slots = validation_slots(request.app.state, settings)
        if always_in_child and slots.full:
            raise slots.refusal(settings)  # the client keeps its bytes: none were read
        stored = await receive_upload(
            request,
            dest_dir=_owner_dir(settings, kind, owner_id),
            max_bytes=settings.max_upload_bytes,
        )
        path = str(stored.path.resolve())
        try:
            known = partial(_known, session, owner_id=owner_id, kind=kind, sha256=stored.sha256)
            if not await anyio.to_thread.run_sync(known):  # the same bytes again: no new check
                await check(stored, settings, slots, request)
            blob, created = await anyio.to_thread.run_sync(
                partial(
                    crud.create_or_get_blob,
                    session,
                    owner_id=owner_id,
                    kind=kind,
                    sha256=stored.sha256,
                    filename=stored.filename,
                    size_bytes=stored.size_bytes,
                    path=path,
                )
            )
        except BaseException:
            with anyio.CancelScope(shield=True):  # a client that hung up still gets cleaned up
                await anyio.to_thread.run_sync(_discard_upload, session, path)
            raise
        if blob.path != path:  # the same bytes under another suffix: the row keeps its own file
            await anyio.to_thread.run_sync(partial(_discard_upload, session, path, failed=False))
        response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        response.headers["Location"] = f"/v1/{plural}/{blob.id}"
        log.info("%s %s %s (%s)", kind, blob.id, "created" if created else "exists", blob.filename)
        return blob

    @router.get(
        "",
        response_model=list_schema,
        summary=f"List {plural}",
        description=f"The caller's {plural}, newest first; with `sha256`, only the {kind} "
        "with those bytes (an empty list when there is none).",
        responses=problem_responses(401),
    )
    def list_(
        session: SessionDep,
        owner_id: OwnerDep,
        sha256: Sha256Filter = None,
        limit: PageLimit = 50,
        cursor: PageCursor = None,
    ) -> dict[str, Any]:
        blobs, next_cursor = crud.list_blobs(
            session, owner_id=owner_id, kind=kind, sha256=sha256, limit=limit, cursor=cursor
        )
        return {"data": blobs, "next_cursor": next_cursor}

    @router.get(
        "/{blob_id}",
        response_model=read_schema,
        summary=f"Get one {kind}",
        responses=problem_responses(401, 404),
    )
    def get(blob_id: BlobId, session: SessionDep, owner_id: OwnerDep) -> Blob:
        blob = crud.get_blob(session, blob_id=blob_id, owner_id=owner_id, kind=kind)
        if blob is None:
            raise ProblemError(404, f"no {kind} with id {blob_id!r}", slug="not-found")
        return blob

    @router.delete(
        "/{blob_id}",
        status_code=status.HTTP_204_NO_CONTENT,
        summary=f"Delete a {kind}",
        responses=problem_responses(401, 404, 409),
    )
    def delete(blob_id: BlobId, session: SessionDep, owner_id: OwnerDep) -> Response:
        try:
            blob = crud.delete_blob(session, blob_id=blob_id, owner_id=owner_id, kind=kind)
        except crud.BlobInUse as exc:
            raise ProblemError(409, str(exc), slug="in-use") from None
        if blob is None:
            raise ProblemError(404, f"no {kind} with id {blob_id!r}", slug="not-found")
        _remove_if_unused(session, blob.path)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    return router
